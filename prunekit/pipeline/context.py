"""The state of one pruning run, handed to lifecycle hooks (``prunekit_after_scoring``, ``prunekit_after_pruning``)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from prunekit.adapters.base import Adapter
    from prunekit.core.config import RunConfig
    from prunekit.core.groups import PruningGroup
    from prunekit.plugin.registry import Registry


@dataclass
class RunContext:
    """What a run knows so far: its config, the model and tokenizer, the groups and kept units, timings."""

    config: "RunConfig"
    registry: "Registry"
    model: Any = None
    tokenizer: Any = None
    adapter: "Adapter | None" = None
    groups: "list[PruningGroup]" = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage into ``timings`` (seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
