"""Old import path of :mod:`prunekit.plugin.hookspecs`, kept for plugins written before the package had folders."""

from prunekit.plugin.hookspecs import *  # noqa: F401,F403
