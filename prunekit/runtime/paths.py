"""User-given paths: ``~`` expanded as a shell would, empty or impossible paths refused naming the field."""

from __future__ import annotations

import os
from pathlib import Path

from prunekit.errors import UserError


def expand_path(value: str | os.PathLike, field: str) -> Path:
    """``~`` and ``~user`` expanded as a shell would; an unknown user is a one-line error naming the field."""
    text = os.fspath(value)
    if not text.strip():
        raise UserError(f"{field}: empty path; give a directory")
    if "\x00" in text:
        raise UserError(f"{field}: path contains a NUL byte")
    path = Path(os.path.expanduser(text)) if text.startswith("~") else Path(text)
    if str(path).startswith("~"):
        raise UserError(f"{field}: cannot expand {text!r} (no such user); write the full path")
    return path
