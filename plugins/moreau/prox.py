"""The proximal operators of the descent: element-wise (l1) and group (l2,1) soft-thresholding, and the authors'
row variant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from prunekit.builtin.moreau.options import _MEDIAN_SAMPLE, MoreauOptions
from prunekit.core.groups import PruningGroup

Tensors = dict[str, torch.Tensor]


class Prox(Protocol):
    """A proximal step applied in place to δ, with the per-group statistic it thresholds."""

    eta: float
    step: float

    def __call__(self, delta: Tensors) -> None: ...

    def statistic(self, tensors: Tensors) -> torch.Tensor: ...


@dataclass
class ElementProx:
    """ℓ1 prox: element-wise soft-threshold sign(v)·max(|v| - γη, 0)."""

    eta: float
    step: float

    def __call__(self, delta: Tensors) -> None:
        """Shrink every element of δ towards zero by γη (exactly the identity when η = 0)."""
        for d in delta.values():
            d.copy_(torch.nn.functional.softshrink(d, self.step * self.eta))

    def statistic(self, tensors: Tensors) -> torch.Tensor:
        """|t| per element (a deterministic strided subsample of large tensors, to bound memory)."""
        parts = []
        for t in tensors.values():
            flat = t.detach().reshape(-1)
            stride = max(1, flat.numel() // _MEDIAN_SAMPLE)
            parts.append(flat[::stride].abs().float())
        return torch.cat(parts)


@dataclass
class UnitGroupProx:
    """ℓ2,1 prox over pruning units: v_G·max(0, 1 - γη/‖v_G‖), ‖·‖ over all coupled rows/columns of a unit."""

    groups: list[PruningGroup]
    eta: float
    step: float

    def __post_init__(self) -> None:
        _refuse_overlap(self.groups)

    def unit_norms(self, group: PruningGroup, tensors: Tensors) -> torch.Tensor:
        """ℓ2 norm of each unit of ``group`` across every coupled slice."""
        sq = None
        for s in group.slices:
            t = tensors[s.param_name]
            channel_sq = torch.linalg.vector_norm(t, dim=1 - s.dim).square()
            unit_sq = channel_sq[s.channels.to(t.device)].sum(dim=1)
            sq = unit_sq if sq is None else sq + unit_sq
        return sq.sqrt()

    def __call__(self, delta: Tensors) -> None:
        """Scale every unit's slices by max(0, 1 - γη/‖v_G‖); groups with norm ≤ γη become exactly zero."""
        threshold = self.step * self.eta
        for group in self.groups:
            norms = self.unit_norms(group, delta)
            scale = (1 - threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min(0)
            for s in group.slices:
                d = delta[s.param_name]
                channel_scale = torch.ones(d.shape[s.dim], dtype=d.dtype, device=d.device)
                channels = s.channels.to(d.device)
                channel_scale[channels] = scale.unsqueeze(1).expand_as(channels)
                d.mul_(channel_scale.unsqueeze(1) if s.dim == 0 else channel_scale.unsqueeze(0))

    def statistic(self, tensors: Tensors) -> torch.Tensor:
        """Unit norms of every group, concatenated."""
        return torch.cat([self.unit_norms(g, tensors) for g in self.groups])


@dataclass
class ReferenceRowProx:
    """The authors' group step: rows of every tensor, RMS compared with γη, then scaled by 1 - η/RMS.

    Rows whose RMS lies in (γη, η) get a negative factor: they change sign and their RMS becomes
    η - RMS, so δ alternates between a large and a small state. 1-D tensors (norm weights, biases) are
    treated per element, as in the released code.
    """

    eta: float
    step: float

    @staticmethod
    def row_rms(t: torch.Tensor) -> torch.Tensor:
        """Root-mean-square of each row (the absolute value of each element of a 1-D tensor)."""
        return t.abs() if t.dim() == 1 else t.pow(2).mean(dim=tuple(range(1, t.dim()))).sqrt()

    def __call__(self, delta: Tensors) -> None:
        """Keep rows with RMS > γη, multiplied by (1 - η/RMS); zero the rest."""
        for d in delta.values():
            rms = self.row_rms(d)
            above = rms > self.step * self.eta
            coeff = torch.where(above, 1 - self.eta / torch.where(above, rms, torch.ones_like(rms)), 0.0)
            d.mul_(coeff.reshape([-1] + [1] * (d.dim() - 1)))

    def statistic(self, tensors: Tensors) -> torch.Tensor:
        """Row RMS of every tensor, concatenated."""
        return torch.cat([self.row_rms(t.detach().float()) for t in tensors.values()])


def _refuse_overlap(groups: list[PruningGroup]) -> None:
    """Group soft-thresholding has a closed form only when every weight belongs to one slice."""
    owner: dict[str, str] = {}
    for g in groups:
        for s in g.slices:
            if s.param_name in owner:
                raise ValueError(f"moreau-gs: {s.param_name} is sliced by both {owner[s.param_name]} and {g.name}; "
                                 "overlapping groups have no closed-form group prox")
            owner[s.param_name] = g.name


def median_statistic(prox: Prox, grads: Tensors) -> float:
    """Median of the statistic ``prox`` thresholds, over the groups of ``grads`` (lower median)."""
    return float(prox.statistic(grads).median())


def make_prox(options: MoreauOptions, groups: list[PruningGroup]) -> Prox:
    """The prox the penalty and mode ask for, at the configured η."""
    step = options.initial_step()
    if options.penalty == "l1":
        return ElementProx(options.eta, step)
    if options.mode == "reference":
        return ReferenceRowProx(options.eta, step)
    return UnitGroupProx(groups, options.eta, step)
