"""Old import path of :mod:`prunekit.importance.finite`, kept for plugins written before the package had folders."""

from prunekit.importance.finite import *  # noqa: F401,F403
