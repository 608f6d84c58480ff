"""Progress bars for long stages (rich), silenced with ``PRUNEKIT_PROGRESS=0`` or when not a terminal."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import track as _rich_track

T = TypeVar("T")


def enabled() -> bool:
    """Progress is on unless ``PRUNEKIT_PROGRESS=0``."""
    return os.environ.get("PRUNEKIT_PROGRESS", "1") != "0"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar when progress is enabled."""
    if not enabled():
        yield from items
        return
    yield from _rich_track(items, description=description, total=total, transient=True)


def progress_bar(show: bool = True) -> Progress:
    """A rich progress display on stderr (stdout stays clean for JSON); a no-op unless ``show`` and :func:`enabled`."""
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not (show and enabled()))
