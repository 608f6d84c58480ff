"""The ``prunekit`` command line (``commands``) and how it turns failures into one line and an exit code
(``failures``)."""

from prunekit.cli.commands import main

__all__ = ["main"]
