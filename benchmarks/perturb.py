"""Perturbations of a checkpoint or of its importance estimation, each applied to a copy of the dense model."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

ROUNDINGS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Perturbed:
    """A perturbed copy of the model, how its estimation runs, and what the perturbation changed."""

    name: str
    kind: str  # rounding | compute | noise | calibration
    model: torch.nn.Module
    compute_dtype: torch.dtype = torch.float32
    calib_seed: int | None = None  # None: the unperturbed run's calibration sample
    level: float | None = None  # relative noise standard deviation
    weights_changed: int = 0
    weights_total: int = 0

    def describe(self) -> dict:
        """JSON-ready facts about the perturbation (no tensors)."""
        return {"name": self.name, "kind": self.kind, "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                "calib_seed": self.calib_seed, "level": self.level, "weights_changed": self.weights_changed,
                "weights_total": self.weights_total}


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    """Distinct parameter tensors (tied weights once)."""
    return list({id(p): p for p in model.parameters()}.values())


def rounded(model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, int, int]:
    """A copy whose weights went float32 -> ``dtype`` -> float32, with the count of weights that changed."""
    clone = copy.deepcopy(model)
    changed = total = 0
    with torch.no_grad():
        for p in _params(clone):
            back = p.to(dtype).to(p.dtype)
            changed += int((back != p).sum())
            total += p.numel()
            p.copy_(back)
    return clone, changed, total


def noisy(model: torch.nn.Module, level: float, seed: int) -> tuple[torch.nn.Module, int, int]:
    """A copy with relative Gaussian noise, w + level·|w|·N(0, 1), on every weight, seeded."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    changed = total = 0
    with torch.no_grad():
        for p in _params(clone):
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
            before = p.clone()
            p.add_(noise * p.abs() * level)
            changed += int((p != before).sum())
            total += p.numel()
    return clone, changed, total


PERTURBATIONS = ("bfloat16-weights", "float16-weights", "bfloat16-estimation", "noise", "calibration-resample")


def perturbations(model: torch.nn.Module, seed: int, noise_levels: tuple[float, ...], calib_seed: int,
                  only: tuple[str, ...] = PERTURBATIONS) -> Iterator[Perturbed]:
    """Yield the robustness suite's perturbations named in ``only``, one copy at a time (only one lives at once)."""
    total = sum(p.numel() for p in _params(model))
    for label, dtype in ROUNDINGS.items():
        if f"{label}-weights" in only:
            clone, changed, _ = rounded(model, dtype)
            yield Perturbed(f"{label}-weights", "rounding", clone, weights_changed=changed, weights_total=total)
    if "bfloat16-estimation" in only:
        yield Perturbed("bfloat16-estimation", "compute", copy.deepcopy(model).to(torch.bfloat16),
                        compute_dtype=torch.bfloat16, weights_total=total)
    for level in noise_levels if "noise" in only else ():
        clone, changed, _ = noisy(model, level, seed)
        yield Perturbed(f"noise-{level:.1%}", "noise", clone, level=level, weights_changed=changed,
                        weights_total=total)
    if "calibration-resample" in only:
        yield Perturbed("calibration-resample", "calibration", model, calib_seed=calib_seed, weights_total=total)
