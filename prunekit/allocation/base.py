"""Allocation: a budget becomes how many units each pruning group loses.

Allocator plugins decide the counts; the core owns the budget maths (per-unit parameter costs, the
per-layer ratio as a parameter target), the feasible counts of every group (GQA partitions, ``round_to``)
and checks that what a plugin returns is feasible and within the budget. A budget that cannot be met
exactly is met from below; the gap is reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch

from prunekit.allocation.probe import LossProbe
from prunekit.core.budget import Budget, feasible_counts, ratio_counts
from prunekit.core.groups import PruningGroup
from prunekit.core.select import removal
from prunekit.errors import UserError

log = logging.getLogger("prunekit.allocation")
BlockKinds = tuple[Literal["attention", "mlp"], ...]


@dataclass
class AllocationContext:
    """What an allocator sees: the groups, their unit scores, per-unit parameter costs, the budget, and
    (for measured allocators) calibration text and a loss probe."""

    model: torch.nn.Module
    groups: list[PruningGroup]
    scores: list[torch.Tensor]
    costs: list[int]
    budget: Budget
    round_to: int = 1
    seed: int = 0
    layers: torch.nn.ModuleList | None = None
    sample: Callable[[int, int], list[torch.Tensor]] | None = None  # (n_samples, seq_len) -> batches
    info: dict[str, Any] = field(default_factory=dict)  # allocators record what they measured (run.json)

    def feasible(self, i: int) -> list[int]:
        return feasible_counts(self.groups[i], self.round_to)

    def removed_params(self, counts: list[int]) -> int:
        return sum(c * cost for c, cost in zip(counts, self.costs))

    def ratio_counts(self, ratio: float, kinds: BlockKinds = ("attention", "mlp")) -> list[int]:
        counts = ratio_counts(self.groups, ratio, self.round_to)
        return [c if g.kind in kinds else 0 for c, g in zip(counts, self.groups)]

    def removal(self, i: int, count: int) -> torch.Tensor:
        """The ``count`` lowest-scored units of group ``i`` (GQA partitions honoured)."""
        return removal(self.groups[i], self.scores[i], count)

    def loss_probe(self, n_samples: int, seq_len: int) -> LossProbe:
        if self.sample is None or self.layers is None:
            raise UserError("allocation: this allocator measures the calibration loss and needs calibration text")
        return LossProbe(self.model, self.layers, self.sample(n_samples, seq_len))


class Allocator(Protocol):
    """What ``prunekit_register_allocators`` registers: a class with a nested pydantic ``Options``."""

    Options: type

    def __init__(self, options: Any) -> None: ...

    def allocate(self, ctx: AllocationContext) -> list[int]: ...


def check_counts(ctx: AllocationContext, counts: list[int], name: str) -> None:
    """A plugin's counts must be feasible for every group and within the budget."""
    if len(counts) != len(ctx.groups):
        raise RuntimeError(f"allocator {name!r} returned {len(counts)} counts for {len(ctx.groups)} groups")
    for i, (g, c) in enumerate(zip(ctx.groups, counts)):
        if c not in set(ctx.feasible(i)):
            raise RuntimeError(f"allocator {name!r}: {c} units is not a feasible removal for {g.name}")
    if ctx.removed_params(counts) > ctx.budget.params:
        raise RuntimeError(f"allocator {name!r} removed {ctx.removed_params(counts)} parameters, "
                           f"over the budget of {ctx.budget.params}")




def allocate(ctx: AllocationContext, name: str, allocator: Allocator) -> tuple[list[int], dict[str, Any]]:
    """Counts from ``allocator``, checked, and the record of what was asked and what was achieved."""
    counts = [int(c) for c in allocator.allocate(ctx)]
    check_counts(ctx, counts, name)
    removed = ctx.removed_params(counts)
    info = {
        "allocator": name,
        "options": allocator.options.model_dump(mode="json") if hasattr(allocator, "options") else {},
        "budget": {"ratio": ctx.budget.ratio, "params": ctx.budget.params,
                   "fraction": round(ctx.budget.fraction, 6)},
        "params_removed": removed,
        "params_removed_fraction": round(removed / ctx.budget.total, 6),
        "gap_params": ctx.budget.params - removed,
        "gap_fraction": round((ctx.budget.params - removed) / ctx.budget.total, 6),
        "counts": {g.name: c for g, c in zip(ctx.groups, counts)},
        **ctx.info,
    }
    return counts, info


def describe(info: dict[str, Any]) -> str:
    """One line for the terminal: budget, achieved fraction and the gap."""
    b = info["budget"]
    asked = f"ratio {b['ratio']} per layer = " if b["ratio"] is not None else ""
    return (f"allocation {info['allocator']}: budget {asked}{100 * b['fraction']:.2f} % of parameters; removed "
            f"{100 * info['params_removed_fraction']:.2f} % (gap {info['gap_params']:,} parameters)")
