"""Pruning groups: the coupled weight slices that every importance method scores alike.

A group is one block of one decoder layer (its attention or its MLP). It holds ``n_units`` prunable
units (a head, a KV group or an MLP channel) and, for every coupled weight, which channels along
which dimension belong to each unit. MLP coupling is discovered by torch-pruning's DependencyGraph;
attention coupling comes from the adapter's head geometry (the graph's GQA head path is unreliable:
it prunes nothing or crashes for some query/KV ratios), and both are pruned with torch-pruning's functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

UnitKind = Literal["head", "kv_group", "channel"]
BlockKind = Literal["attention", "mlp"]


@dataclass(frozen=True)
class CoupledSlice:
    """The channels of one Linear weight that belong to the units of a group.

    ``dim`` 0 means output rows of ``weight`` ([out, in]); 1 means input columns.
    ``channels[u]`` lists the channel indices unit ``u`` owns (same count for every unit).
    """

    module_name: str
    dim: int
    channels: torch.Tensor  # LongTensor [n_units, channels_per_unit]

    @property
    def param_name(self) -> str:
        return f"{self.module_name}.weight"


@dataclass
class PruningGroup:
    """One prunable block of one layer, with its units and coupled slices."""

    name: str
    kind: BlockKind
    layer: int
    unit: UnitKind
    n_units: int
    slices: tuple[CoupledSlice, ...]
    # Units that must lose the same number of members (query heads inside each KV group under GQA);
    # partition[u] is the partition id of unit u. None: units are selected freely.
    partition: torch.Tensor | None = None
    # The module/dim whose channels root the torch-pruning dependency group, when pruned via the graph.
    graph_root: tuple[str, int] | None = None
    # Norm weights that shrink with the units but are not scored (OLMo 2's q/k norms over the full
    # projection width); ``dim`` is 0, ``channels`` index the norm's entries.
    followers: tuple[CoupledSlice, ...] = ()
    meta: dict = field(default_factory=dict)

    @property
    def n_parts(self) -> int:
        """How many partitions lose units alike (KV groups under GQA); 1 when units are selected freely."""
        return 1 if self.partition is None else len(self.partition.unique())

    @property
    def units_per_part(self) -> int:
        """Units in each partition (query heads per KV group; every unit when there is no partition)."""
        return self.n_units // self.n_parts

    def channels_of(self, units: torch.Tensor, slice_: CoupledSlice) -> torch.Tensor:
        """Flat, sorted channel indices of ``slice_`` owned by ``units``."""
        return slice_.channels[units].reshape(-1).sort().values


def unit_scores(
    groups: list[PruningGroup],
    salience: dict[str, torch.Tensor],
    reduction: str = "sum",
    signed: bool = False,
) -> list[torch.Tensor]:
    """Reduce per-weight salience to one float32 score per unit of every group.

    Per slice, a channel's score is the sum of salience over its row/column; a unit sums its channels;
    coupled slices are combined with ``reduction`` (sum | mean | max). This is the Taylor/LLM-Pruner
    reduction that every gradient method shares. ``signed`` salience is summed per channel before the
    absolute value is taken (vector-wise Taylor, |sum w*g|).
    """
    scores = []
    for group in groups:
        per_slice = []
        for s in group.slices:
            sal = salience[s.param_name].float()
            channel_score = sal.sum(dim=1 - s.dim)  # one value per row (dim 0) or column (dim 1)
            if signed:
                channel_score = channel_score.abs()
            per_slice.append(channel_score[s.channels].sum(dim=1))
        # coupled weights may sit on several devices
        stacked = torch.stack([t.to(per_slice[0].device) for t in per_slice])
        if reduction == "sum":
            scores.append(stacked.sum(0))
        elif reduction == "mean":
            scores.append(stacked.mean(0))
        elif reduction == "max":
            scores.append(stacked.max(0).values)
        else:
            raise ValueError(f"reduction must be one of sum, mean, max; got {reduction!r}")
    return scores


def prunable_param_names(groups: list[PruningGroup]) -> list[str]:
    """Every weight that some group slices, in a stable order."""
    seen: dict[str, None] = {}
    for g in groups:
        for s in g.slices:
            seen.setdefault(s.param_name, None)
    return list(seen)
