"""``moreau`` and ``moreau-gs``: importance from the Moreau-envelope gradient (MoreauPruner, arXiv 2406.07017).

The signal replaces the plain calibration gradient by the gradient of the loss's Moreau envelope,
-δ*/ρ, where δ* minimises L_σ(w + δ) + ‖δ‖²/(2ρ) (+ η·penalty(δ)). δ* is estimated by proximal
stochastic gradient descent from δ = 0 with fresh relative Gaussian noise every step:

    v = δ - γ·(∇L(w + ε + δ) + δ/ρ),   δ ← prox_{γη}(v),   ε ~ N(0, (σ|w|)²)

δ̄ is the mean of δ over the last ``averaged`` of ``iterations`` steps and the per-weight salience is
|w·δ̄|, which the shared :func:`prunekit.core.groups.unit_scores` reduction turns into unit scores exactly
like first-order Taylor. ``penalty`` picks the prox: ``l1`` element-wise soft-thresholding (method
``moreau``) or ``group`` soft-thresholding over the pruning units (method ``moreau-gs``).

``mode="reference"`` reproduces the authors' released code instead of the equations (no δ/ρ pull-back,
every parameter perturbed and updated, the group step on rows of every tensor that thresholds a row's
RMS against γη but shrinks by η). See docs/moreau.md for the differences and the memory layout.
"""

from __future__ import annotations

from typing import Callable

import torch

from prunekit import hookimpl
from prunekit.builtin.moreau.descent import GradientStep, StepScale, _global_norm, gradient_step, proximal_descent
from prunekit.builtin.moreau.options import PAPER, PRESETS, MoreauOptions
from prunekit.builtin.moreau.perturbed import InPlacePerturbedGradient, PerturbedStep, linear_modules, noise_seed
from prunekit.builtin.moreau.prox import (
    ElementProx,
    Prox,
    ReferenceRowProx,
    Tensors,
    UnitGroupProx,
    make_prox,
    median_statistic,
)
from prunekit.errors import UserError
from prunekit.importance.base import Importance, ScoringContext, fisher_diagonal
from prunekit.importance.precision import GradientOverflow, LossScale, requires_grad_only

__all__ = ["ElementProx", "GradientStep", "InPlacePerturbedGradient", "Moreau", "MoreauOptions", "PAPER", "PRESETS",
           "PerturbedStep", "ReferenceRowProx", "StepScale", "UnitGroupProx", "gradient_step", "linear_modules",
           "make_prox", "median_statistic", "noise_seed", "proximal_descent", "prunekit_register_importances"]


# -- proximal operators -----------------------------------------------------------------------------


# -- the proximal gradient loop -----------------------------------------------------------------------


# -- the gradient at the perturbed model ----------------------------------------------------------------


# -- the method ---------------------------------------------------------------------------------------


def scope_params(ctx: ScoringContext, mode: str) -> dict[str, torch.nn.Parameter]:
    """Parameters that get noise and δ: the prunable weights (math) or every parameter (reference)."""
    return ctx.params() if mode == "math" else dict(ctx.model.named_parameters())


class Moreau(Importance):
    """Moreau-envelope gradient importance |w·δ̄| (MoreauPruner; ℓ1 or ℓ2,1 over pruning units)."""

    Options = MoreauOptions
    needs_calibration = True

    def salience(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """|w·δ̄| for every prunable weight, δ̄ the averaged proximal iterate."""
        o: MoreauOptions = self.options  # type: ignore[assignment]
        if o.resample and o.iterations > 1 and ctx.sampler is None:  # before any work, not at step 2
            raise UserError("method_options.resample: true draws fresh calibration text at every step, but this "
                            "scoring has no sampler (give a tokenizer, or sampler= to api.score); "
                            "set resample=false to reuse the given batches")
        params = scope_params(ctx, o.mode)
        seed = ctx.seed if o.seed is None else o.seed
        modules = linear_modules(ctx.model, params) if o.mode == "math" else None
        loss_scale = LossScale.for_params(params.values())
        while True:  # float16: an overflowing loss scale is halved and the descent redone from δ = 0
            try:
                mean_delta = self._descend(ctx, o, params, seed, modules, loss_scale)
                break
            except GradientOverflow:
                loss_scale.backoff()
        if loss_scale.enabled:
            ctx.info["moreau"]["loss_scale"] = loss_scale.describe()
        if o.salience == "fisher":
            return fisher_at(ctx, mean_delta)
        return {n: mean_delta.pop(n).mul_(w.detach()).abs_() for n, w in ctx.params().items()}

    def _descend(self, ctx: ScoringContext, o: MoreauOptions, params: dict[str, torch.nn.Parameter], seed: int,
                 modules: dict[str, torch.nn.Linear] | None, loss_scale: LossScale) -> Tensors:
        """The proximal descent from δ = 0; returns δ̄ (float32 per scope weight) and records the settings."""
        prox = make_prox(o, ctx.groups)
        info = self._settings(o, params, seed, in_place=modules is None)
        rho = o.rho if o.mode == "math" else None
        scale = StepScale(_global_norm({n: p.detach() for n, p in params.items()}), o.rho_relative, o.step_fraction)
        with requires_grad_only(ctx.model, set() if modules is not None else set(params)):
            step_fn: PerturbedStep | GradientStep
            if modules is not None:
                estimator = PerturbedStep(ctx, modules, o.sigma, seed, o.noise_samples, o.initial_step(), rho,
                                          resample_calibration=o.resample, loss_scale=loss_scale)
                step_fn = estimator
            else:
                estimator = InPlacePerturbedGradient(ctx, params, o.sigma, seed, o.noise_samples,
                                                     resample_calibration=o.resample, loss_scale=loss_scale)
                step_fn = gradient_step(estimator, o.initial_step(), rho)
            delta = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            delta_norms: list[float] = []
            relative_eta = self._relative_eta(prox, o.eta_relative)

            def on_first_step(first: Tensors) -> None:
                if o.rho_relative is not None or o.step_fraction is not None:
                    scale(first, step_fn, prox)
                if relative_eta is not None:
                    relative_eta(first)

            mean_delta = proximal_descent(
                step_fn, delta, prox, iterations=o.iterations, averaged=o.averaged,
                on_first_step=on_first_step,
                on_iteration=lambda t, d: delta_norms.append(_global_norm(d)),
            )
            del delta
            if isinstance(estimator, InPlacePerturbedGradient):
                estimator.originals.clear()
        info.update(eta_effective=prox.eta, threshold=prox.step * prox.eta, delta_norms=delta_norms,
                    losses=estimator.losses, step_effective=step_fn.step, rho_effective=step_fn.rho, **scale.found)
        if o.mode == "reference" and o.penalty == "group":
            info["shrink"] = prox.eta
        ctx.info["moreau"] = info
        return mean_delta

    @staticmethod
    def _relative_eta(prox: Prox, eta_relative: float | None) -> Callable[[Tensors], None] | None:
        """With ``eta_relative`` set, fix η from the first gradient's median group statistic.

        The first step's v is -γ·∇L and every statistic is absolutely homogeneous, so dividing by γ gives
        the gradient's statistic without keeping the gradient.
        """
        if eta_relative is None:
            return None

        def calibrate(first_step: Tensors) -> None:
            prox.eta = eta_relative * median_statistic(prox, first_step) / prox.step

        return calibrate

    @staticmethod
    def _settings(o: MoreauOptions, params: dict[str, torch.nn.Parameter], seed: int, in_place: bool) -> dict:
        """Effective settings for run.json, including the float32 state the estimator holds."""
        elements = sum(p.numel() for p in params.values())
        return {
            "penalty": o.penalty, "mode": o.mode, "iterations": o.iterations, "averaged": o.averaged,
            "step": o.step, "rho": o.rho if o.mode == "math" else None, "sigma": o.sigma, "eta": o.eta,
            "eta_relative": o.eta_relative, "noise_samples": o.noise_samples, "seed": seed,
            "resample": o.resample, "rho_relative": o.rho_relative, "step_fraction": o.step_fraction,
            "salience": o.salience,
            "scope": "prunable" if o.mode == "math" else "all", "scope_tensors": len(params),
            "scope_elements": elements,
            # fused: δ + running mean + W', float32; in place: δ + running mean + gradient sums, float32,
            # and a copy of the originals in the model's dtype
            "state_bytes": 12 * elements + (sum(p.numel() * p.element_size() for p in params.values())
                                            if in_place else 0),
        }


def fisher_at(ctx: ScoringContext, mean_delta: Tensors) -> Tensors:
    """½·w²·F(w + δ̄): the OBD salience with the Fisher diagonal taken at the smoothed proximal point.

    The prunable weights are moved to w + δ̄ in place for the per-sample passes over the run's calibration
    sample and copied back bit for bit afterwards (also on failure); w in ½·w² is the original weight.
    """
    params = ctx.params()
    originals = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(mean_delta.pop(n).to(p.dtype))
        with requires_grad_only(ctx.model, set(params)):
            _, fisher = fisher_diagonal(ctx, with_mean=False)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(originals[n])
    return {n: fisher.pop(n).mul_(originals.pop(n).float().square()).mul_(0.5) for n in params}


@hookimpl
def prunekit_register_importances(register) -> None:
    register("moreau", Moreau, defaults=PRESETS["moreau"],
             description="Moreau-envelope gradient importance |w*mean(delta)| with element-wise (l1) "
                         "soft-thresholding (MoreauPruner)")
    register("moreau-gs", Moreau, defaults=PRESETS["moreau-gs"],
             description="Moreau-envelope importance with group (l2,1) soft-thresholding over the pruning units, "
                         "tuned preset: 5 steps on fresh calibration text, scale-free rho/step, Fisher salience "
                         "at the smoothed point (about 6 taylor passes; the paper's settings: moreau-gs-paper)")
    register("moreau-gs-paper", Moreau, defaults=PRESETS["moreau-gs-paper"],
             description="moreau-gs with the paper's settings (T=10, gamma=2e-4, rho=0.2, gradient salience; "
                         "moreau-gs's defaults before the quality-per-compute sweep), about 10 taylor passes")
    # The authors' released behaviour under its own names, so benchmarks compare both modes side by side.
    register("moreau-reference", Moreau, defaults=PRESETS["moreau-reference"],
             description="moreau as the authors' released code computes it (no pull-back, every parameter)")
    register("moreau-gs-reference", Moreau, defaults=PRESETS["moreau-gs-reference"],
             description="moreau-gs as the authors' released code computes it (row-RMS groups, every parameter)")
