"""Old import path of :mod:`prunekit.allocation.base`, kept for plugins written before the package had folders."""

from prunekit.allocation.base import *  # noqa: F401,F403
