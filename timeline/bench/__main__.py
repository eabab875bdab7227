"""`python -m timeline.bench`: the same as the timeline-bench console script."""

import sys

from timeline.bench.cli import main

sys.exit(main())
