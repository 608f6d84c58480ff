"""Moreau with scale-free step/ρ (rho_relative, step_fraction) and per-step calibration resampling."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama
from pydantic import ValidationError

from prunekit.adapters.grouping import GrouperOptions, build_groups
from prunekit.adapters.llama import LlamaAdapter
from prunekit.builtin.moreau import (
    ElementProx,
    Moreau,
    MoreauOptions,
    StepScale,
    _global_norm,
    gradient_step,
    proximal_descent,
)
from prunekit.errors import UserError
from prunekit.importance.base import ScoringContext

FAST = {"iterations": 3, "averaged": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def quadratic():
    """Weights w and per-element curvatures a of L(w) = ½·Σ a·w²."""
    gen = torch.Generator().manual_seed(0)
    w = {"x": torch.randn(5, 3, generator=gen, dtype=torch.float64),
         "y": torch.randn(7, generator=gen, dtype=torch.float64)}
    a = {n: torch.rand(t.shape, generator=gen, dtype=torch.float64) * 3 + 0.1 for n, t in w.items()}
    return w, a


def envelope(w, a, rho_relative: float | None, step_fraction: float | None, iterations: int, averaged: int,
             step: float = 2e-4, rho: float = 0.2):
    """-δ̄/ρ of the proximal loop on the quadratic (σ = η = 0), with the first-step rescaling, and ρ used."""
    delta = {n: torch.zeros_like(t) for n, t in w.items()}
    initial = step_fraction * rho if step_fraction is not None and rho_relative is None else step
    fn = gradient_step(lambda d, t: {n: a[n] * (w[n] + d[n]) for n in d}, initial, rho)
    prox = ElementProx(0.0, initial)
    scale = StepScale(_global_norm(w), rho_relative, step_fraction)
    relative = rho_relative is not None or step_fraction is not None
    mean = proximal_descent(fn, delta, prox, iterations=iterations, averaged=averaged,
                            on_first_step=(lambda v: scale(v, fn, prox)) if relative else None)
    return {n: -m / fn.rho for n, m in mean.items()}, fn.rho, fn.step


def test_rho_relative_and_step_fraction_reach_the_closed_form_in_few_steps():
    """ρ = r·‖w‖/‖∇L‖, γ = c·ρ: 12 steps land on a·w/(1 + aρ) (the contraction is 1 - c·(1 + aρ) per step)."""
    w, a = quadratic()
    r, c = 0.1, 0.5
    got, rho, step = envelope(w, a, r, c, iterations=12, averaged=2)
    grad_norm = _global_norm({n: a[n] * w[n] for n in w})
    assert rho == pytest.approx(r * _global_norm(w) / grad_norm)
    assert step == pytest.approx(c * rho)
    worst = max(float((1 - c * (1 + a[n] * rho)).abs().max()) for n in w)  # slowest contraction
    for n in w:
        want = a[n] * w[n] / (1 + a[n] * rho)
        assert float(((got[n] - want) / want).abs().max()) <= 2 * worst ** 10


def test_reference_step_stays_far_from_the_proximal_point():
    """γ = 2e-4, ρ = 0.2, T = 10 (the reference settings) covers ~1 % of the way: δ_t ≈ -t·γ·∇L."""
    w, a = quadratic()
    got, rho, _ = envelope(w, a, None, None, iterations=10, averaged=5)
    for n in w:
        ratio = got[n] / (a[n] * w[n] / (1 + a[n] * rho))
        assert float(ratio.max()) < 0.02  # mean of t = 6..10 steps of γ/ρ = 1e-3 each, times (1 + aρ)


def test_step_fraction_with_absolute_rho():
    w, a = quadratic()
    got, rho, step = envelope(w, a, None, 0.5, iterations=40, averaged=5, rho=0.3)
    assert (rho, step) == (0.3, 0.15)
    for n in w:
        torch.testing.assert_close(got[n], a[n] * w[n] / (1 + a[n] * rho), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bad", [
    {"rho": 0.1, "rho_relative": 0.01}, {"step": 1e-3, "step_fraction": 0.5}, {"step_fraction": 1.5},
    {"rho_relative": 0.0}, {"mode": "reference", "rho_relative": 0.01}, {"mode": "reference", "step_fraction": 0.5},
])
def test_inconsistent_relative_options_are_refused(bad):
    with pytest.raises(ValidationError):
        MoreauOptions(**bad)


def test_relative_step_without_step_fraction_must_stay_below_rho():
    """rho_relative with an absolute γ larger than the ρ it finds is refused at the first step."""
    w, a = quadratic()
    with pytest.raises(UserError, match="^method_options.step: .*must be < rho"):
        envelope(w, a, 1e-6, None, iterations=2, averaged=1, step=1.0)


# -- on the tiny model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups():
    model = make_tiny_llama(8, 2)
    return build_groups(model, LlamaAdapter(model), range(4), GrouperOptions())


def sampler(draw: int):
    """Seeded random token batches: draw k is always the same."""
    gen = torch.Generator().manual_seed(1000 + draw)
    return [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(2)], {"seed": 1000 + draw}


def score(groups, calibration_ids, with_sampler=True, **options):
    ctx = ScoringContext(make_tiny_llama(8, 2), groups, calibration_ids, seed=0,
                         sampler=sampler if with_sampler else None)
    return Moreau(MoreauOptions(penalty="group", **options)).scores(ctx), ctx.info


def test_resample_draws_a_fresh_sample_per_step_and_records_it(groups, calibration_ids):
    plain, _ = score(groups, calibration_ids, **FAST)
    fresh, info = score(groups, calibration_ids, resample=True, **FAST)
    assert [d["draw"] for d in info["calibration_draws"]] == [1, 2]  # step 0 uses the run's own sample
    assert [d["seed"] for d in info["calibration_draws"]] == [1001, 1002]
    assert info["moreau"]["resample"] is True
    assert any(not torch.equal(a, b) for a, b in zip(plain, fresh))
    again, _ = score(groups, calibration_ids, resample=True, **FAST)
    assert all(torch.equal(a, b) for a, b in zip(fresh, again))  # deterministic for a seed


def test_resample_with_one_step_is_a_plain_run(groups, calibration_ids):
    one = {"iterations": 1, "averaged": 1}
    plain, _ = score(groups, calibration_ids, **one)
    fresh, info = score(groups, calibration_ids, resample=True, **one)
    assert all(torch.equal(a, b) for a, b in zip(plain, fresh))
    assert "calibration_draws" not in info


def test_resample_without_a_sampler_is_an_error(groups, calibration_ids):
    with pytest.raises(UserError, match="^method_options.resample: .*no sampler"):  # before any work
        score(groups, calibration_ids, with_sampler=False, resample=True, **FAST)


def test_model_path_records_the_effective_step_and_rho(groups, calibration_ids):
    _, info = score(groups, calibration_ids, rho_relative=1e-3, step_fraction=0.5, **FAST)
    m = info["moreau"]
    assert m["rho_effective"] == pytest.approx(1e-3 * m["weight_norm"] / m["first_grad_norm"])
    assert m["step_effective"] == pytest.approx(0.5 * m["rho_effective"])
    assert m["threshold"] == pytest.approx(m["step_effective"] * m["eta_effective"])
    assert all(math.isfinite(x) for x in m["losses"])


# -- second-order salience at the smoothed point ------------------------------------------------------


def test_fisher_salience_at_a_vanishing_step_is_the_fisher_method(groups, calibration_ids):
    from prunekit.builtin.fisher import Fisher, FisherOptions

    ctx = ScoringContext(make_tiny_llama(8, 2), groups, calibration_ids, seed=0)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    flags = [p.requires_grad for p in ctx.model.parameters()]
    smoothed = Moreau(MoreauOptions(penalty="group", salience="fisher", step=1e-12, sigma=0.0, **FAST)).scores(ctx)
    assert all(torch.equal(p, before[n]) for n, p in ctx.model.named_parameters())  # weights restored exactly
    assert [p.requires_grad for p in ctx.model.parameters()] == flags
    plain = Fisher(FisherOptions()).scores(ScoringContext(make_tiny_llama(8, 2), groups, calibration_ids, seed=0))
    for a, b in zip(smoothed, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)
    moved, info = score(groups, calibration_ids, salience="fisher", rho_relative=1e-2, step_fraction=0.5, **FAST)
    assert info["moreau"]["salience"] == "fisher"
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(moved, plain))
