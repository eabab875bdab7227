"""`python -m timeline.rpc`: timeline-grpc, without the console script (the image runs this)."""

from timeline.rpc.cli import main

main()
