"""Selection: from unit scores to the units each group keeps.

``ratio`` is the fraction of units removed in each pruned layer (the LLM-Pruner meaning). Local
ranking compares units inside one group; global ranking compares units of the same block kind across
all pruned layers. Groups with a partition (query heads inside KV groups) lose the same number of
units in every partition so the layer stays a valid GQA layer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from prunekit.groups import PruningGroup


def _n_remove(n: int, ratio: float, multiple: int = 1) -> int:
    """Units to remove from ``n``: nearest to ratio*n, keeping at least one and, if asked, a multiple."""
    keep = n - int(math.floor(ratio * n + 0.5))
    if multiple > 1 and n % multiple == 0:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return n - max(1, min(n, keep))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest scores; ties broken by index so the mask is deterministic."""
    order = torch.sort(scores.double(), stable=True).indices
    return order[:k]


def _keep_from_removal(group: PruningGroup, scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    if group.partition is None:
        removed = _lowest(scores, n_remove)
    else:
        parts = group.partition.unique()
        per_part = min(n_remove // len(parts), int((group.partition == parts[0]).sum()) - 1)
        removed = torch.cat([
            torch.nonzero(group.partition == p).flatten()[_lowest(scores[group.partition == p], per_part)]
            for p in parts
        ])
    mask = torch.ones(group.n_units, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().flatten()


def select(
    groups: list[PruningGroup],
    scores: list[torch.Tensor],
    ratio: float,
    scope: Literal["local", "global"] = "local",
    round_to: int = 1,
) -> list[torch.Tensor]:
    """Sorted indices of the units every group keeps."""
    if scope == "local":
        counts = [_local_count(g, ratio, round_to) for g in groups]
    else:
        counts = _global_counts(groups, scores, ratio)
    return [_keep_from_removal(g, s, k) for g, s, k in zip(groups, scores, counts)]


def _local_count(group: PruningGroup, ratio: float, round_to: int) -> int:
    if group.partition is None:
        return _n_remove(group.n_units, ratio, round_to if group.unit == "channel" else 1)
    n_parts = len(group.partition.unique())
    return n_parts * _n_remove(group.n_units // n_parts, ratio)


def _global_counts(groups: list[PruningGroup], scores: list[torch.Tensor], ratio: float) -> list[int]:
    """Per group, how many of its units fall in the lowest ``ratio`` of its block kind across layers."""
    counts = [0] * len(groups)
    for kind in {g.kind for g in groups}:
        idx = [i for i, g in enumerate(groups) if g.kind == kind]
        flat = torch.cat([scores[i].double() for i in idx])
        owner = torch.cat([torch.full((groups[i].n_units,), i) for i in idx])
        k = int(math.floor(ratio * flat.numel() + 0.5))
        for i in owner[_lowest(flat, k)].tolist():
            counts[i] += 1
        for i in idx:  # never empty a layer
            counts[i] = min(counts[i], groups[i].n_units - 1)
    return counts
