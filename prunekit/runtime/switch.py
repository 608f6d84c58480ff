"""A process-wide, nestable on/off switch: the disk caches that only ``prunekit run`` uses are on inside its block."""

from __future__ import annotations

import contextlib
from typing import Iterator


class Switch:
    """Off by default; on inside every ``with switch.on():`` block (nested blocks count)."""

    def __init__(self) -> None:
        self._depth = 0

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def active(self) -> bool:
        """Whether some block has it on."""
        return self._depth > 0
