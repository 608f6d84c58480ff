"""``python -m prunekit.benchmarks``: the harness's command line."""

import sys

from prunekit.benchmarks.harness import main

sys.exit(main())
