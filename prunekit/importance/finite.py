"""Broken models named early: NaN/Inf in weights found at load, and the first layer whose output goes
non-finite when a calibration loss does."""

from __future__ import annotations

import torch

from prunekit.errors import UserError


def check_weights_finite(model: torch.nn.Module, source: str = "model") -> None:
    """A one-line UserError naming the first parameter or buffer holding NaN or Inf.

    Sums each tensor in float32 first (one reduction, no boolean copy); only a non-finite sum is
    inspected element-wise, so finite weights whose sum overflows are not misreported.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":  # meta: offloaded by accelerate
            continue
        if torch.isfinite(t.detach().sum(dtype=torch.float32)):
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            raise UserError(f"model: {source} is broken: weight {name} holds {nan} NaN and {inf} Inf values "
                            f"(of {t.numel()}); pruning it would save a model that outputs NaN")


def first_nonfinite_module(model: torch.nn.Module, batch: torch.Tensor) -> str | None:
    """The name of the first module (in execution order) whose output holds NaN/Inf on ``batch``."""
    found: list[str] = []
    handles = []

    def hook(name: str):
        def check(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not found and isinstance(out, torch.Tensor) and out.is_floating_point() \
                    and not torch.isfinite(out).all():
                found.append(name)
        return check

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def nonfinite_loss(model: torch.nn.Module, batch: torch.Tensor, what: str) -> FloatingPointError:
    """The error for a non-finite loss: ``what`` (which loss, which step) plus the first layer that went non-finite."""
    where = first_nonfinite_module(model, batch)
    return FloatingPointError(f"non-finite {what}" + (f"; first non-finite output: {where}" if where else ""))
