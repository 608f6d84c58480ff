"""Progress bars for long stages (rich), silenced with ``PRUNEKIT_PROGRESS=0`` or when not a terminal."""

from __future__ import annotations

import os
import sys
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
    """Progress is on when stderr (where bars are drawn) is a terminal, unless ``PRUNEKIT_PROGRESS=0``; in a log
    (``prunekit run > log.txt 2>&1``) a bar would leave its frames behind, so there is none."""
    if os.environ.get("PRUNEKIT_PROGRESS", "1") == "0":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


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
