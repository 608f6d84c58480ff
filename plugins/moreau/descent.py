"""Proximal stochastic gradient descent on the perturbation delta: step sizes, the pull-back, the loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from prunekit.builtin.moreau.prox import Prox, Tensors
from prunekit.errors import UserError
from prunekit.importance.base import ScoringContext
from prunekit.importance.finite import nonfinite_loss
from prunekit.importance.precision import LossScale

GradFn = Callable[[Tensors, int], Tensors]  # (current δ, iteration) -> ∇L at the perturbed point
StepFn = Callable[[Tensors, int], None]  # (δ, iteration) -> δ moved in place to δ - γ·(∇L [+ δ/ρ])


@dataclass
class GradientStep:
    """The step δ ← δ·(1 - γ/ρ) - γ·∇L from a function returning ∇L (rho None: no pull-back).

    ``step`` and ``rho`` are read at every call, so a first-step calibration (:class:`StepScale`) can set them.
    """

    grad_at: GradFn
    step: float
    rho: float | None

    def __call__(self, delta: Tensors, t: int) -> None:
        grads = self.grad_at(delta, t)
        pull_back(delta, self.step, self.rho)
        for name, d in delta.items():
            d.add_(grads[name], alpha=-self.step)


def gradient_step(grad_at: GradFn, step: float, rho: float | None) -> GradientStep:
    """:class:`GradientStep` from a function returning ∇L."""
    return GradientStep(grad_at, step, rho)


@dataclass
class StepScale:
    """Scale-free γ and ρ, fixed from the first gradient (called on the first step's v = -γ₀·∇L).

    ``rho_relative`` r: ρ = r·‖w‖/‖∇L‖ over the scope, so the first-order proximal displacement
    ‖δ*‖ ≈ ρ‖∇L‖ is a fraction r of the weights' norm. ``step_fraction`` c: γ = c·ρ, so the iteration's
    contraction on directions of small curvature is 1 - c and T steps leave (1 - c)^T of the way to
    the proximal point (docs/moreau.md, "Reaching the proximal point"). v is rescaled to the new γ
    (δ₀ = 0, so the first step is exactly linear in γ); ``step_fn`` and ``prox`` get the new values.
    """

    weight_norm: float
    rho_relative: float | None
    step_fraction: float | None
    found: dict = field(default_factory=dict)

    def __call__(self, first_step: Tensors, step_fn, prox: Prox) -> None:
        old = step_fn.step
        grad_norm = _global_norm(first_step) / old
        rho = step_fn.rho
        if self.rho_relative is not None:
            if grad_norm == 0:
                raise FloatingPointError("moreau: the first gradient is zero; rho_relative has no scale")
            rho = self.rho_relative * self.weight_norm / grad_norm
        step = self.step_fraction * rho if self.step_fraction is not None else old
        if step >= rho:  # the user's input, found once the first gradient gives rho its scale
            raise UserError(f"method_options.step: step ({step:g}) must be < rho ({rho:g}) = rho_relative x "
                            "|w|/|grad L| on this model; lower step or use step_fraction")
        for d in first_step.values():
            d.mul_(step / old)
        step_fn.step, step_fn.rho, prox.step = step, rho, step
        self.found.update(first_grad_norm=grad_norm, weight_norm=self.weight_norm)


def pull_back(delta: Tensors, step: float, rho: float | None) -> None:
    """δ ← δ·(1 - γ/ρ), the Moreau term of the step (rho None: reference mode, no pull-back)."""
    if rho is not None:
        for d in delta.values():
            d.mul_(1 - step / rho)


def proximal_descent(
    gradient_step: StepFn,
    delta: Tensors,
    prox: Prox,
    *,
    iterations: int,
    averaged: int,
    on_first_step: Callable[[Tensors], None] | None = None,
    on_iteration: Callable[[int, Tensors], None] | None = None,
) -> Tensors:
    """Run T proximal steps on δ in place and return the mean δ of the last K.

    ``gradient_step(delta, t)`` moves δ to v = δ - γ·(∇L(w + ε + δ) [+ δ/ρ]) in place; the model path
    fuses it into the backward pass, the unit tests build it from a closed-form gradient with
    :func:`gradient_step`. ``on_first_step`` sees v of the first step, which is -γ·∇L (δ starts at 0).
    """
    acc: Tensors = {}
    for t in range(iterations):
        gradient_step(delta, t)
        if t == 0 and on_first_step is not None:
            on_first_step(delta)
        prox(delta)
        if t >= iterations - averaged:
            for name, d in delta.items():
                if name in acc:
                    acc[name].add_(d)
                else:
                    acc[name] = d.clone()
        if on_iteration is not None:
            on_iteration(t, delta)
    for a in acc.values():
        a.div_(averaged)
    return acc


def backward_calibration(ctx: ScoringContext, step: int, batches: list[torch.Tensor] | None = None,
                         loss_scale: LossScale | None = None) -> float:
    """Backpropagate every calibration batch's loss (stopping on NaN/Inf); returns the mean loss.

    ``batches`` (default: the context's sample) is the step's own sample when resampling; ``loss_scale``
    scales the backward of float16 models (the caller unscales)."""
    total = 0.0
    step_batches = ctx.batches if batches is None else batches
    for index, loss in enumerate(ctx.iter_losses() if batches is None else ctx.iter_losses(batches)):
        if not torch.isfinite(loss):  # name the first layer that went non-finite at the perturbed weights
            raise nonfinite_loss(ctx.model, step_batches[index], f"moreau calibration loss at iteration {step + 1}")
        if loss_scale is None:
            loss.backward()
        else:
            loss_scale.backward(loss)
        total += float(loss.detach())
    return total


def _global_norm(tensors: Tensors) -> float:
    """ℓ2 norm of all tensors together (bf16/fp16 tensors are reduced in float32)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float32) if t.dtype in _NARROW else
                               torch.linalg.vector_norm(t)) ** 2 for t in tensors.values()))


_NARROW = (torch.bfloat16, torch.float16)
