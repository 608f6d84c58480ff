"""``python -m benchmarks``: the harness's command line."""

import sys

from benchmarks.harness import main

sys.exit(main())
