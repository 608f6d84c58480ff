"""Atomic file writes: through a temporary file in the same folder and ``os.replace``, so a reader (or a crash)
never sees half a file, with the mode an ordinary new file gets (the umask's, not mkstemp's 0600)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def ordinary_file_mode() -> int:
    """The mode a new file gets from ``open`` under the current umask (mkstemp's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, ordinary_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON (non-JSON values as ``str``) to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")
