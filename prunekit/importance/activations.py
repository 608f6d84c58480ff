"""Per-input-channel activation statistics of Linear layers, gathered in one pass over calibration batches.

Activation-based methods (Wanda, FLAP, ...) all need the same numbers about what flows *into* each
prunable Linear layer: per input channel the sum of squares over every calibration token (‖X_j‖² — Wanda's
norm), the sum, and hence the mean and the variance (FLAP's fluctuation). The core gathers them once,
with forward pre-hooks it registers and always removes, so no method hand-rolls hook code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivationStats:
    """Statistics of one Linear layer's input over ``count`` tokens; float64 vectors of ``in_features``."""

    sq_sum: torch.Tensor  # Σ_t x_tj²
    sum: torch.Tensor  # Σ_t x_tj
    count: int

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's activation norm)."""
        return self.sq_sum.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of each input channel over the tokens (FLAP's fluctuation), clamped at 0."""
        return (self.sq_sum / self.count - self.mean ** 2).clamp_min(0)


@torch.no_grad()
def collect_activation_stats(model: torch.nn.Module, module_names: list[str],
                             batches: list[torch.Tensor]) -> dict[str, ActivationStats]:
    """Input statistics of each named Linear over all ``batches`` (one forward pass each, in eval mode).

    Hooks are removed and the model's train/eval mode restored even when a forward pass fails.
    """
    if not batches:
        raise ValueError("activation statistics need calibration batches (set needs_calibration)")
    sq: dict[str, torch.Tensor] = {}
    sm: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if name not in sq:
                sq[name], sm[name], counts[name] = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1]), 0
            sq[name] += x.square().sum(0)
            sm[name] += x.sum(0)
            counts[name] += x.shape[0]
        return hook

    from prunekit.runtime.devices import input_device

    device = input_device(model)  # accelerate's first device when the model is dispatched
    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in module_names]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in module_names if n not in sq]
    if missing:
        raise RuntimeError(f"no activations reached {missing[0]} during the calibration pass")
    return {n: ActivationStats(sq[n].cpu(), sm[n].cpu(), counts[n]) for n in module_names}
