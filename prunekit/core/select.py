"""Selection: from unit scores and per-group counts to the units each group keeps.

An allocator (see :mod:`prunekit.allocation.base`) decides how many units each group loses; selection removes
the lowest-scored ones. Groups with a partition (query heads inside KV groups) lose the same number of
units in every partition so the layer stays a valid GQA layer. :func:`select` keeps the historical
ratio interface (``local``: LLM-Pruner's per-layer ratio; ``global``: one ranking per block kind).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from prunekit.core.budget import floor_feasible, ratio_counts
from prunekit.core.groups import PruningGroup


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest scores; ties broken by index so the mask is deterministic."""
    order = torch.sort(scores.double(), stable=True).indices
    return order[:k]


def removal(group: PruningGroup, scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Sorted indices of the ``n_remove`` lowest-scored units (spread evenly over partitions)."""
    if group.partition is None:
        removed = _lowest(scores, n_remove)
    else:
        parts = group.partition.unique()
        per_part = min(n_remove // len(parts), group.units_per_part - 1)
        removed = torch.cat([
            torch.nonzero(group.partition == p).flatten()[_lowest(scores[group.partition == p], per_part)]
            for p in parts
        ])
    return removed.sort().values


def _keep_from_removal(group: PruningGroup, scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    mask = torch.ones(group.n_units, dtype=torch.bool)
    mask[removal(group, scores, n_remove)] = False
    return mask.nonzero().flatten()


def keep_from_counts(groups: list[PruningGroup], scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Sorted indices of the units every group keeps when it loses ``counts[i]`` lowest-scored units."""
    return [_keep_from_removal(g, s, k) for g, s, k in zip(groups, scores, counts)]


def select(
    groups: list[PruningGroup],
    scores: list[torch.Tensor],
    ratio: float,
    scope: Literal["local", "global"] = "local",
    round_to: int = 1,
) -> list[torch.Tensor]:
    """Sorted indices of the units every group keeps (the per-layer ratio, local or global ranking)."""
    counts = (ratio_counts(groups, ratio, round_to) if scope == "local"
              else global_counts(groups, scores, ratio, round_to=round_to))
    return keep_from_counts(groups, scores, counts)


def global_counts(groups: list[PruningGroup], scores: list[torch.Tensor], ratio: float,
                  kinds: tuple[str, ...] | None = None, round_to: int = 1) -> list[int]:
    """Per group, how many of its units fall in the lowest ``ratio`` of its block kind across layers
    (floored to what the group's partitions and ``round_to`` allow; every group keeps a unit)."""
    counts = [0] * len(groups)
    for kind in sorted({g.kind for g in groups}):
        if kinds is not None and kind not in kinds:
            continue
        idx = [i for i, g in enumerate(groups) if g.kind == kind]
        flat = torch.cat([scores[i].double() for i in idx])
        owner = torch.cat([torch.full((groups[i].n_units,), i) for i in idx])
        k = int(math.floor(ratio * flat.numel() + 0.5))
        for i in owner[_lowest(flat, k)].tolist():
            counts[i] += 1
    return [floor_feasible(g, c, round_to) for g, c in zip(groups, counts)]
