"""Declarative block geometry: which rows/columns of which Linear (and which norm entries) belong to a unit.

An adapter describes each attention and MLP block as a list of :class:`Slot` objects; the grouper turns
them into coupled slices and ``rebuild`` resizes modules from them, so neither assumes q/k/v/o or
gate/up/down names, separate or fused projections, or a head layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Role = Literal["q", "kv", "channel"]
SlotKind = Literal["weight", "norm"]


@dataclass(frozen=True)
class Slot:
    """Unit ``u`` owns channels ``offset + u*stride + [0, width)`` along ``dim`` of ``module``.

    ``role`` says which units index the slot: ``q`` (query heads), ``kv`` (key/value heads) or
    ``channel`` (MLP channels). ``kind`` ``weight``: rows (dim 0, bias included) or columns (dim 1) of
    an ``nn.Linear``; ``norm``: entries of a norm's 1-D weight (and bias) that shrink with the unit.
    """

    module: str
    dim: int
    role: Role
    width: int = 1
    stride: int | None = None  # None: equal to width (units are contiguous)
    offset: int = 0
    kind: SlotKind = "weight"

    def channels(self, n_units: int) -> torch.Tensor:
        """LongTensor [n_units, width]: the channels each unit owns."""
        stride = self.width if self.stride is None else self.stride
        return self.offset + torch.arange(n_units).unsqueeze(1) * stride + torch.arange(self.width).unsqueeze(0)


def merge_channels(tables: list[torch.Tensor]) -> torch.Tensor:
    """Several slots on one module/dim (fused projections) become one table: a unit owns all of them."""
    return torch.cat(tables, dim=1) if len(tables) > 1 else tables[0]


def widths(slots: list[Slot], counts: dict[str, int]) -> dict[tuple[str, int, str], int]:
    """Size of every sliced module/dim when ``counts[role]`` units exist (slots cover their dims fully)."""
    out: dict[tuple[str, int, str], int] = {}
    for s in slots:
        key = (s.module, s.dim, s.kind)
        out[key] = out.get(key, 0) + counts[s.role] * s.width
    return out


def replace_linear(model: nn.Module, name: str, in_features: int, out_features: int) -> None:
    """Swap ``name`` for an ``nn.Linear`` of the given size (same bias, dtype, device); values are loaded later."""
    old = model.get_submodule(name)
    if (old.in_features, old.out_features) == (in_features, out_features):
        return
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, dtype=old.weight.dtype,
                    device=old.weight.device)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def resize_norm(model: nn.Module, name: str, size: int) -> None:
    """Give norm ``name`` 1-D parameters of ``size`` entries (values are loaded later)."""
    norm = model.get_submodule(name)
    for pname, p in list(norm.named_parameters(recurse=False)):
        if p.dim() == 1 and p.numel() != size:
            setattr(norm, pname, nn.Parameter(torch.ones(size, dtype=p.dtype, device=p.device),
                                              requires_grad=p.requires_grad))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (size,)


def slice_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    """Keep entries ``keep`` of every 1-D parameter of a norm (its weight and, for LayerNorm, bias)."""
    for pname, p in list(norm.named_parameters(recurse=False)):
        if p.dim() == 1:
            setattr(norm, pname, nn.Parameter(p.data[keep.to(p.device)].clone(), requires_grad=p.requires_grad))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (int(keep.numel()),)
