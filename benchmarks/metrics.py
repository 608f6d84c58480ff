"""Mask comparison (IoU, flipped units) and summary statistics over seeds."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

import torch

from prunekit.core.groups import PruningGroup

Unit = tuple[str, int]  # (group name, unit index)


def iou(a: set, b: set) -> float:
    """Intersection over union of two sets; two empty sets agree completely (1.0)."""
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def kept_units(groups: Sequence[PruningGroup], kept: Sequence[torch.Tensor],
               which: Iterable[int] | None = None) -> set[Unit]:
    """The kept units of the groups at positions ``which`` (all when None) as (group, unit) pairs."""
    idx = range(len(groups)) if which is None else which
    return {(groups[i].name, int(u)) for i in idx for u in kept[i].tolist()}


def compare_masks(groups: Sequence[PruningGroup], base: Sequence[torch.Tensor],
                  other: Sequence[torch.Tensor]) -> dict:
    """IoU of kept units (overall, per block kind, per layer) and units whose keep/remove decision flipped."""
    def part(which: list[int]) -> tuple[float, int]:
        """IoU and flip count over the groups at positions ``which``."""
        a, b = kept_units(groups, base, which), kept_units(groups, other, which)
        return iou(a, b), len(a ^ b)

    out: dict = {}
    out["iou"], out["flipped"] = part(list(range(len(groups))))
    for kind in sorted({g.kind for g in groups}):
        out[f"iou_{kind}"], out[f"flipped_{kind}"] = part([i for i, g in enumerate(groups) if g.kind == kind])
    out["iou_per_layer"] = {str(layer): part([i for i, g in enumerate(groups) if g.layer == layer])[0]
                            for layer in sorted({g.layer for g in groups})}
    return out


def summary(values: Sequence[float | None]) -> dict | None:
    """Mean, min, max and spread (max - min) of the values that exist; None when none do."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "spread": max(vals) - min(vals), "n": len(vals)}
