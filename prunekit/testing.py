"""Old import path of :mod:`prunekit.plugin.testing`, kept for plugins written before the package had folders."""

from prunekit.plugin.testing import *  # noqa: F401,F403
