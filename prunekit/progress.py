"""Progress bars for long stages (rich), silenced with ``PRUNEKIT_PROGRESS=0`` or when not a terminal."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.progress import track as _rich_track

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("PRUNEKIT_PROGRESS", "1") != "0"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar when progress is enabled."""
    if not enabled():
        yield from items
        return
    yield from _rich_track(items, description=description, total=total, transient=True)
