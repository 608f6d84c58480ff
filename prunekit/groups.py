"""Old import path of :mod:`prunekit.core.groups`, kept for plugins written before the package had folders."""

from prunekit.core.groups import *  # noqa: F401,F403
