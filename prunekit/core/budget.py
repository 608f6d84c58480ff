"""Budget maths: per-unit parameter costs, the feasible counts of every group (GQA partitions, ``round_to``), the
per-layer ratio as counts and as a parameter target."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from prunekit.core.groups import PruningGroup


def unit_cost(model: torch.nn.Module, group: PruningGroup) -> int:
    """Parameters one unit of ``group`` owns across its coupled slices (weights and output biases)."""
    cost = 0
    for s in group.slices:
        module = model.get_submodule(s.module_name)
        per_channel = module.weight.shape[1 - s.dim]
        if s.dim == 0 and getattr(module, "bias", None) is not None:
            per_channel += 1
        cost += per_channel * s.channels.shape[1]
    return cost


def feasible_counts(group: PruningGroup, round_to: int = 1) -> list[int]:
    """Every number of units ``group`` may lose, ascending (0 included; at least one unit stays).

    Partitioned groups (query heads inside KV groups) lose the same number in every partition; MLP
    widths stay a multiple of ``round_to`` when the width is one.
    """
    if group.partition is not None:
        return [group.n_parts * k for k in range(group.units_per_part)]
    step = round_to if (group.unit == "channel" and round_to > 1 and group.n_units % round_to == 0) else 1
    return list(range(0, group.n_units - step + 1, step))


def floor_feasible(group: PruningGroup, count: int, round_to: int = 1) -> int:
    """The largest feasible count not above ``count``."""
    best = 0
    for c in feasible_counts(group, round_to):
        if c > count:
            break
        best = c
    return best


def ratio_counts(groups: list[PruningGroup], ratio: float, round_to: int = 1) -> list[int]:
    """LLM-Pruner's per-layer ratio: nearest to ratio*n in every group (at least one unit kept)."""
    counts = []
    for g in groups:
        if g.partition is None:
            multiple = round_to if g.unit == "channel" else 1
            keep = g.n_units - int(math.floor(ratio * g.n_units + 0.5))
            if multiple > 1 and g.n_units % multiple == 0:
                keep = max(multiple, int(round(keep / multiple)) * multiple)
            counts.append(g.n_units - max(1, min(g.n_units, keep)))
        else:
            per_part = g.units_per_part
            keep = per_part - int(math.floor(ratio * per_part + 0.5))
            counts.append(g.n_parts * (per_part - max(1, min(per_part, keep))))
    return counts


def search_ratio(counts_at: Callable[[float], list[int]], cost: Callable[[list[int]], int], target: int) -> list[int]:
    """Counts at the largest ratio whose removed parameters stay within ``target`` (bisection; the
    removal of a ratio rule only grows with the ratio)."""
    lo, hi = 0.0, 1.0
    best = counts_at(0.0)
    if cost(best) > target:
        return [0] * len(best)
    for _ in range(50):
        mid = (lo + hi) / 2
        counts = counts_at(mid)
        if cost(counts) <= target:
            lo, best = mid, counts
        else:
            hi = mid
    return best


@dataclass(frozen=True)
class Budget:
    """What may be removed: at most ``params`` parameters (of ``total``), and the per-layer ``ratio`` it
    came from when the user gave a ratio rather than a parameter fraction."""

    params: int
    total: int
    ratio: float | None = None

    @property
    def fraction(self) -> float:
        return self.params / self.total


def make_budget(groups: list[PruningGroup], costs: list[int], total: int, ratio: float,
                params_removed: float | None, round_to: int = 1) -> Budget:
    """A parameter fraction as given, or the per-layer ratio as the parameters it removes uniformly."""
    if params_removed is not None:
        return Budget(params=int(math.floor(params_removed * total)), total=total)
    counts = ratio_counts(groups, ratio, round_to)
    return Budget(params=sum(c * cost for c, cost in zip(counts, costs)), total=total, ratio=ratio)
