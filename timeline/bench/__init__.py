"""Benchmarks: the timeline-bench harness, the baseline app and the `make bench` suite."""
