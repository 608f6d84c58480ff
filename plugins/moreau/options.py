"""What a user may set for moreau and moreau-gs: the options model and the registered presets."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from prunekit.importance.base import Options

# At most this many elements per tensor enter the median of element-wise magnitudes (eta_relative, l1).
_MEDIAN_SAMPLE = 1 << 20


class MoreauOptions(Options):
    """Settings of the Moreau-envelope estimator; defaults are the authors' LLaMA-7B run."""

    # two ways to give one value: a user who sets one replaces a preset's other (prunekit.plugin.presets)
    alternatives: ClassVar[tuple[tuple[str, str], ...]] = (
        ("rho", "rho_relative"), ("step", "step_fraction"), ("eta", "eta_relative"))

    penalty: Literal["l1", "group"] = "l1"
    mode: Literal["math", "reference"] = "math"
    iterations: int = Field(10, ge=1, description="proximal gradient steps T")
    averaged: int = Field(5, ge=1, description="δ is averaged over the last K steps")
    step: float = Field(2e-4, gt=0, description="step size γ")
    rho: float = Field(0.2, gt=0, description="Moreau parameter ρ (unused in reference mode)")
    sigma: float = Field(0.05, ge=0, description="relative noise: ε has standard deviation σ·|w|")
    eta: float = Field(5e-6, ge=0, description="sparsity weight η; prox threshold is γ·η")
    eta_relative: float | None = Field(
        None, ge=0, description="if set, η = eta_relative × median group norm of the first gradient (scale-free)")
    noise_samples: int = Field(1, ge=1, description="noise draws averaged per step")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="noise seed; None uses the run seed")
    resample: bool = Field(False, description="a fresh seeded calibration sample at every step after the first")
    rho_relative: float | None = Field(
        None, gt=0, description="if set, ρ = rho_relative × ‖w‖/‖∇L(w)‖ from the first gradient (scale-free)")
    step_fraction: float | None = Field(
        None, gt=0, le=1, description="if set, γ = step_fraction × ρ (reaches the proximal point in a few steps)")
    salience: Literal["gradient", "fisher"] = Field(
        "gradient", description="gradient: |w·δ̄|; fisher: ½·w²·F with F the per-sample Fisher at w + δ̄")

    @model_validator(mode="after")
    def _consistent(self) -> "MoreauOptions":
        """Reject settings that cannot mean what the user asked for."""
        if self.averaged > self.iterations:
            raise ValueError(f"averaged ({self.averaged}) must be <= iterations ({self.iterations})")
        relative = self.rho_relative is not None or self.step_fraction is not None
        if self.mode == "math" and not relative and self.step >= self.rho:
            raise ValueError(f"step ({self.step}) must be < rho ({self.rho}): the delta/rho pull-back would overshoot")
        if self.eta_relative is not None and "eta" in self.model_fields_set:
            raise ValueError("set eta or eta_relative, not both")
        if self.rho_relative is not None and "rho" in self.model_fields_set:
            raise ValueError("set rho or rho_relative, not both")
        if self.step_fraction is not None and "step" in self.model_fields_set:
            raise ValueError("set step or step_fraction, not both")
        if self.mode == "reference" and relative:
            raise ValueError("rho_relative and step_fraction need mode 'math' (reference mode has no pull-back)")
        return self

    def initial_step(self) -> float:
        """γ before the first gradient is seen: step_fraction × ρ for an absolute ρ, else ``step``
        (with rho_relative the first step is rescaled once ρ is known, see :class:`StepScale`)."""
        if self.step_fraction is not None and self.rho_relative is None:
            return self.step_fraction * self.rho
        return self.step


# The registered presets (method name -> option defaults); the sweep's cost count reads them too.
# moreau-gs: the quality-per-compute sweep's choice on PTB validation at <= 10 taylor passes (6: five steps on
# fresh calibration text plus one Fisher pass at the smoothed point; docs/moreau.md, "The moreau-gs preset").
# moreau-gs-paper: the authors' LLaMA-7B settings, moreau-gs's defaults before that choice.
PAPER = {"iterations": 10, "averaged": 5, "step": 2e-4, "rho": 0.2, "mode": "math"}
PRESETS: dict[str, dict] = {
    "moreau": {"penalty": "l1"},
    "moreau-gs": {"penalty": "group", "iterations": 5, "averaged": 2, "resample": True, "rho_relative": 1e-4,
                  "step_fraction": 0.5, "salience": "fisher"},
    "moreau-gs-paper": {"penalty": "group", **PAPER},
    "moreau-reference": {"penalty": "l1", "mode": "reference"},
    "moreau-gs-reference": {"penalty": "group", "mode": "reference"},
}
