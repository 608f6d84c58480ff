"""The repair stage: after pruning and before recovery, a registered repair updates the kept weights without
training (a removed unit's mean contribution into a bias, a least-squares re-fit of the output projections).

A repair that declares ``needs_dense = True`` gets ``ctx.dense``, an untouched copy of the model taken just
before the units were removed (same device and dtype, gradients off), released when the stage ends.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from prunekit.data.sources import calibration_batches
from prunekit.errors import UserError
from prunekit.runtime.devices import offloaded

if TYPE_CHECKING:  # pragma: no cover - typing only
    from prunekit.adapters.base import Adapter
    from prunekit.core.config import RunConfig
    from prunekit.core.groups import PruningGroup

# Seeds of the run's text draws: the scoring sample uses the calibration seed, the allocator's probe +1, repair +2.
REPAIR_SEED_OFFSET = 2


@dataclass
class RepairContext:
    """What a repair sees: the pruned model (changed in place), the dense copy when asked for, the groups and
    the units each kept, and ``calibration(n_samples, seq_len, source=None)`` for seeded repair text."""

    model: torch.nn.Module
    adapter: Adapter
    groups: list[PruningGroup]
    kept: list[torch.Tensor]
    config: RunConfig
    calibration: Callable[..., list[torch.Tensor]]
    dense: torch.nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)


def needs_dense(repair_entry: Any) -> bool:
    """Whether the registered repair asks for the dense copy (class attribute ``needs_dense``)."""
    return bool(repair_entry is not None and getattr(repair_entry.impl, "needs_dense", False))


def dense_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An untouched copy of ``model`` for a repair that compares against the dense outputs."""
    if offloaded(model):
        raise UserError("repair: this repair compares against a dense copy, which offloaded (meta) weights do not "
                        "allow; use repair name none, or a device_map without cpu/disk offload")
    dense = copy.deepcopy(model).eval()
    dense.requires_grad_(False)
    return dense


def repair_sampler(tokenizer: Any, config: RunConfig, batches: list[torch.Tensor] | None,
                   batch_size: int = 8) -> Callable[..., list[torch.Tensor]]:
    """``calibration(n_samples, seq_len, source=None)``: seeded windows of the repair text (the run's calibration
    source unless the repair names one), or the caller's own batches when the run has no tokenizer."""

    def calibration(n_samples: int, seq_len: int, source: str | None = None) -> list[torch.Tensor]:
        if tokenizer is None:
            if not batches:
                raise UserError("tokenizer: this repair needs text; pass a tokenizer (or batches=)")
            return list(batches)
        ids, _ = calibration_batches(tokenizer, source=source or config.calibration.source, n_samples=n_samples,
                                     seq_len=seq_len, seed=config.calibration_seed + REPAIR_SEED_OFFSET)
        return list(ids.split(batch_size))

    return calibration


def run_repair(entry: Any, options: Any, ctx: RepairContext) -> dict[str, Any]:
    """Call the repair and return its run.json record: name, provider, options and what it reported."""
    info = entry.impl(options).repair(ctx) or {}
    return {"name": entry.name, "provider": entry.provider, "options": options.model_dump(mode="json"), "info": info}
