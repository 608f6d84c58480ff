"""``python -m prunekit.cli`` (what ``accelerate launch -m`` needs)."""

import sys

from prunekit.cli import main

sys.exit(main())
