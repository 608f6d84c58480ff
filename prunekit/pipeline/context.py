"""The state of one pruning run, handed to lifecycle hooks (``prunekit_after_scoring``, ``prunekit_after_pruning``)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

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
    # told (stage name, seconds) when a stage completes: the CLI prints one line per stage from it
    on_stage: Callable[[str, float], None] | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage into ``timings`` (seconds) and tell ``on_stage`` when it completed."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
        if self.on_stage is not None:
            self.on_stage(name, self.timings[name])
