"""Calibration text from the user's own file or folder, with the provenance named sources record.

A file is read as UTF-8; a folder contributes every ``*.txt`` file below it in sorted path order, joined
like the named sources' documents. The manifest records the resolved path, the file count and a SHA-256
of the bytes read, so a run says exactly which text it calibrated on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prunekit.data.text import Text
from prunekit.errors import UserError


def local_text(path: Path, joiner: str = "\n\n") -> Text:
    """The text of ``path`` (a file, or a folder of ``*.txt`` files) as a :class:`prunekit.data.text.Text`."""
    path = path.expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"calibration.source: folder {path} holds no *.txt files (accepted: a text file, "
                        f"a folder of *.txt files, or a named source)")
    digest, documents = hashlib.sha256(), []
    for file in files:
        raw = file.read_bytes()
        digest.update(raw)
        try:
            documents.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"calibration.source: {file} is not UTF-8 text") from None
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise UserError(f"calibration.source: {path} holds no text")
    variant = f"local {'file' if path.is_file() else 'folder'}, {len(files)} file(s), sha256 {digest.hexdigest()}"
    return Text(joiner.join(documents), "local", "-", variant, str(path), tuple(documents))
