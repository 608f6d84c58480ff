"""Old import path of :mod:`prunekit.importance.precision`, kept for plugins written before the package had folders."""

from prunekit.importance.precision import *  # noqa: F401,F403
