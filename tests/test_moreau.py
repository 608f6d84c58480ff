"""The Moreau-envelope estimator: closed forms, prox operators, determinism, reference mode, failures."""

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
    ReferenceRowProx,
    UnitGroupProx,
    gradient_step,
    noise_seed,
    proximal_descent,
    prunekit_register_importances,
)
from prunekit.core.groups import CoupledSlice, PruningGroup
from prunekit.core.select import select
from prunekit.importance.base import ScoringContext

FAST = {"iterations": 4, "averaged": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def gqa_groups():
    """Real pruning groups of the 8q/2kv tiny model (names only depend on the config, not the weights)."""
    model = make_tiny_llama(8, 2)
    return build_groups(model, LlamaAdapter(model), range(4), GrouperOptions())


def tiny_ctx(groups, calibration_ids, seed: int = 0) -> ScoringContext:
    """A fresh 8q/2kv tiny model (same weights every call) with its groups and calibration batches."""
    return ScoringContext(make_tiny_llama(8, 2), groups, calibration_ids, seed=seed)


def run(ctx: ScoringContext, **options) -> list[torch.Tensor]:
    """Score ``ctx`` with the Moreau method under ``options``."""
    return Moreau(MoreauOptions(**options)).scores(ctx)


# -- registration and options ---------------------------------------------------------------------


def test_registers_presets_of_one_class():
    seen = {}
    prunekit_register_importances(lambda name, cls, defaults=None, description=None: seen.update(
        {name: (cls, defaults, description)}))
    assert set(seen) == {"moreau", "moreau-gs", "moreau-gs-paper", "moreau-reference", "moreau-gs-reference"}
    assert all(cls is Moreau for cls, _, _ in seen.values())
    presets = {name: MoreauOptions(**defaults) for name, (_, defaults, _) in seen.items()}
    assert (presets["moreau"].penalty, presets["moreau"].mode) == ("l1", "math")
    assert (presets["moreau-gs"].penalty, presets["moreau-gs"].mode) == ("group", "math")
    assert (presets["moreau-reference"].penalty, presets["moreau-reference"].mode) == ("l1", "reference")
    assert (presets["moreau-gs-reference"].penalty, presets["moreau-gs-reference"].mode) == ("group", "reference")
    assert all(d for _, _, d in seen.values())
    # moreau-gs: the issue-13 sweep's choice; moreau-gs-paper: the authors' settings (its defaults before)
    gs, paper = presets["moreau-gs"], presets["moreau-gs-paper"]
    assert (gs.penalty, gs.mode, gs.iterations, gs.averaged, gs.resample, gs.rho_relative, gs.step_fraction,
            gs.salience) == ("group", "math", 5, 2, True, 1e-4, 0.5, "fisher")
    assert (paper.penalty, paper.mode, paper.iterations, paper.averaged, paper.step, paper.rho, paper.resample,
            paper.rho_relative, paper.step_fraction, paper.salience) == (
        "group", "math", 10, 5, 2e-4, 0.2, False, None, None, "gradient")
    assert paper.model_dump(exclude={"penalty"}) == presets["moreau"].model_dump(exclude={"penalty"})


def test_reference_defaults():
    o = MoreauOptions()
    assert ((o.iterations, o.averaged, o.step, o.rho, o.sigma, o.eta, o.noise_samples)
            == (10, 5, 2e-4, 0.2, 0.05, 5e-6, 1))
    assert o.mode == "math" and o.seed is None and o.eta_relative is None


@pytest.mark.parametrize("bad", [
    {"averaged": 11}, {"iterations": 0}, {"step": 0.5, "rho": 0.2}, {"eta": 1e-6, "eta_relative": 0.1},
    {"sigma": -1.0}, {"penalty": "l2"}, {"mode": "paper"}, {"unknown": 1},
])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValidationError):
        MoreauOptions(**bad)


def test_reference_mode_allows_step_above_rho():
    assert MoreauOptions(mode="reference", step=0.5, rho=0.2).step == 0.5


# -- the proximal gradient loop ---------------------------------------------------------------------


def test_quadratic_converges_to_envelope_gradient():
    """L = ½·a·w² (σ = 0, η = 0): -δ̄/ρ must equal the closed form a·w/(1 + aρ)."""
    gen = torch.Generator().manual_seed(0)
    w = {"x": torch.randn(5, 3, generator=gen), "y": torch.randn(7, generator=gen)}
    a = {"x": torch.rand(5, 3, generator=gen) * 3 + 0.1, "y": torch.rand(7, generator=gen) * 3 + 0.1}
    rho, step = 0.5, 0.1
    delta = {n: torch.zeros_like(t) for n, t in w.items()}
    grad = gradient_step(lambda d, t: {n: a[n] * (w[n] + d[n]) for n in d}, step, rho)
    mean_delta = proximal_descent(grad, delta, ElementProx(0.0, step), iterations=300, averaged=20)
    for n in w:
        torch.testing.assert_close(-mean_delta[n] / rho, a[n] * w[n] / (1 + a[n] * rho), rtol=1e-5, atol=1e-6)


def test_averaging_uses_the_last_k_iterates():
    """With a constant gradient and no pull-back δ_t = -t·γ·g, so the mean of the last 3 of 5 is -4γg."""
    g = torch.tensor([1.0, -2.0])
    mean_delta = proximal_descent(gradient_step(lambda d, t: {"w": g}, 0.5, None), {"w": torch.zeros(2)},
                                  ElementProx(0.0, 0.5), iterations=5, averaged=3)
    torch.testing.assert_close(mean_delta["w"], -4 * 0.5 * g)


# -- prox operators -------------------------------------------------------------------------------


def synthetic_group() -> PruningGroup:
    """Three units of two channels each: rows of a.weight [6, 3] and columns of b.weight [4, 6]."""
    channels = torch.arange(6).view(3, 2)
    return PruningGroup("g", "mlp", 0, "channel", 3,
                        (CoupledSlice("a", 0, channels), CoupledSlice("b", 1, channels)))


def test_group_soft_threshold_zeroes_small_units_and_shrinks_the_rest():
    threshold = 0.5  # γ = 1, η = 0.5
    a, b = torch.zeros(6, 3), torch.zeros(4, 6)
    a[0, 0] = 0.5  # unit 0: norm exactly γη -> zero
    a[2, :] = 0.1  # unit 1: norm 0.1·√3 + column part < γη -> zero
    b[:, 3] = 0.05
    a[4, :] = 1.0  # unit 2: large norm, spread over both slices -> shrunk by γη
    b[:, 5] = 2.0
    delta = {"a.weight": a.clone(), "b.weight": b.clone()}
    prox = UnitGroupProx([synthetic_group()], eta=threshold, step=1.0)
    before = prox.unit_norms(synthetic_group(), delta)
    prox(delta)
    after = prox.unit_norms(synthetic_group(), delta)
    assert before[0] == threshold and before[1] < threshold
    assert after[0] == 0 and after[1] == 0
    assert delta["a.weight"][:4].abs().sum() == 0 and delta["b.weight"][:, :4].abs().sum() == 0
    torch.testing.assert_close(after[2], before[2] - threshold)
    # shrinking keeps the direction: every element of unit 2 is scaled by the same factor
    factor = (1 - threshold / before[2]).item()
    torch.testing.assert_close(delta["a.weight"][4], a[4] * factor)
    torch.testing.assert_close(delta["b.weight"][:, 5], b[:, 5] * factor)


def test_group_soft_threshold_on_real_groups(gqa_groups):
    model = make_tiny_llama(8, 2)
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    delta = {s.param_name: torch.randn(named[s.param_name].shape, generator=gen) * 0.01
             for g in gqa_groups for s in g.slices}
    prox = UnitGroupProx(gqa_groups, eta=0.05, step=2.0)
    before = [prox.unit_norms(g, delta) for g in gqa_groups]
    prox(delta)
    for g, norm in zip(gqa_groups, before):
        torch.testing.assert_close(prox.unit_norms(g, delta), (norm - 0.1).clamp_min(0), atol=1e-6, rtol=1e-5)


def test_element_soft_threshold():
    v = torch.tensor([-3.0, -0.25, -0.2, 0.0, 0.1, 0.25, 2.0])
    delta = {"w": v.clone()}
    ElementProx(eta=0.5, step=0.5)(delta)  # threshold 0.25
    torch.testing.assert_close(delta["w"], torch.tensor([-2.75, 0.0, 0.0, 0.0, 0.0, 0.0, 1.75]))


def test_reference_row_prox_flips_rows_between_thresholds():
    """Rows with RMS in (γη, η) are scaled by 1 - η/RMS < 0: sign flips and RMS becomes η - RMS."""
    delta = {"w": torch.tensor([[0.3, 0.3], [2.0, 2.0], [1e-4, 1e-4]])}
    ReferenceRowProx(eta=1.0, step=1e-2)(delta)  # γη = 0.01, shrink by η = 1
    torch.testing.assert_close(delta["w"], torch.tensor([[-0.7, -0.7], [1.0, 1.0], [0.0, 0.0]]))


# -- on a tiny model ---------------------------------------------------------------------------------


def test_eta_zero_l1_and_group_give_identical_scores(gqa_groups, calibration_ids):
    l1 = run(tiny_ctx(gqa_groups, calibration_ids), penalty="l1", eta=0.0, **FAST)
    gs = run(tiny_ctx(gqa_groups, calibration_ids), penalty="group", eta=0.0, **FAST)
    assert all(torch.equal(x, y) for x, y in zip(l1, gs))


@pytest.mark.parametrize("penalty", ["l1", "group"])
def test_same_seed_same_scores_and_mask(gqa_groups, calibration_ids, penalty):
    first = run(tiny_ctx(gqa_groups, calibration_ids, seed=3), penalty=penalty, **FAST)
    again = run(tiny_ctx(gqa_groups, calibration_ids, seed=3), penalty=penalty, **FAST)
    other = run(tiny_ctx(gqa_groups, calibration_ids, seed=4), penalty=penalty, **FAST)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))  # the noise depends on the seed
    keep = [k.tolist() for k in select(gqa_groups, first, 0.25)]
    assert keep == [k.tolist() for k in select(gqa_groups, again, 0.25)]


def test_option_seed_overrides_run_seed(gqa_groups, calibration_ids):
    a = run(tiny_ctx(gqa_groups, calibration_ids, seed=1), penalty="group", seed=9, **FAST)
    b = run(tiny_ctx(gqa_groups, calibration_ids, seed=2), penalty="group", seed=9, **FAST)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["math", "reference"])
def test_weights_and_flags_are_restored_exactly(gqa_groups, calibration_ids, mode):
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    run(ctx, penalty="group", mode=mode, **FAST)
    for n, p in ctx.model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad and p.grad is None


def test_scope_and_info(gqa_groups, calibration_ids):
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    run(ctx, penalty="group", **FAST)
    info = ctx.info["moreau"]
    assert info["scope"] == "prunable" and info["scope_tensors"] == len(ctx.params())
    assert len(info["delta_norms"]) == len(info["losses"]) == FAST["iterations"]
    assert info["threshold"] == pytest.approx(2e-4 * 5e-6) and info["seed"] == 0
    ref = tiny_ctx(gqa_groups, calibration_ids)
    run(ref, penalty="group", mode="reference", **FAST)
    assert ref.info["moreau"]["scope_tensors"] == len(list(ref.model.parameters()))
    assert ref.info["moreau"]["rho"] is None and ref.info["moreau"]["shrink"] == 5e-6


@pytest.mark.parametrize("penalty", ["l1", "group"])
@pytest.mark.parametrize("mode", ["math", "reference"])
def test_salience_covers_every_prunable_weight(gqa_groups, calibration_ids, penalty, mode):
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    sal = Moreau(MoreauOptions(penalty=penalty, mode=mode, **FAST)).salience(ctx)
    assert set(sal) == set(ctx.params())
    assert all(s.shape == ctx.params()[n].shape and s.dtype == torch.float32 and (s >= 0).all()
               for n, s in sal.items())


def test_eta_relative_zeroes_the_units_below_the_median(gqa_groups, calibration_ids):
    """One noise-free step at η = median unit norm of ∇L zeroes exactly the units at or below the median."""
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    scores = torch.cat(run(ctx, penalty="group", eta_relative=1.0, sigma=0.0, iterations=1, averaged=1))
    n = scores.numel()
    assert (scores == 0).sum() == math.ceil(n / 2)
    assert ctx.info["moreau"]["eta_effective"] > 0
    assert ctx.info["moreau"]["threshold"] == pytest.approx(2e-4 * ctx.info["moreau"]["eta_effective"])


def test_reference_mode_iterates_alternate(gqa_groups, calibration_ids):
    """Rows in the (γη, η) band flip every step: the δ norm alternates large, small, large, ..."""
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    run(ctx, penalty="group", mode="reference", eta=1e-3, iterations=8, averaged=4)
    norms = ctx.info["moreau"]["delta_norms"]
    for t in range(0, len(norms) - 1, 2):
        assert norms[t] > 5 * norms[t + 1], norms
        if t + 2 < len(norms):
            assert norms[t + 2] > 5 * norms[t + 1], norms
    math_ctx = tiny_ctx(gqa_groups, calibration_ids)
    run(math_ctx, penalty="group", eta=1e-3, iterations=8, averaged=4)
    steady = math_ctx.info["moreau"]["delta_norms"]
    assert all(later >= earlier for earlier, later in zip(steady, steady[1:])), steady  # no alternation


def test_nan_loss_names_the_iteration_and_restores_weights(gqa_groups, calibration_ids, monkeypatch):
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    calls = {"n": 0}
    clean = ScoringContext.iter_losses

    def poisoned(self):
        calls["n"] += 1
        for loss in clean(self):
            yield loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ScoringContext, "iter_losses", poisoned)
    with pytest.raises(FloatingPointError, match="iteration 3"):
        run(ctx, penalty="group", **FAST)
    assert all(torch.equal(p, before[n]) for n, p in ctx.model.named_parameters())


def test_nan_gradient_names_the_tensor(gqa_groups, calibration_ids):
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    name = list(ctx.params())[0]  # nothing upstream of the first prunable layer is in scope
    module = ctx.model.get_submodule(name.rpartition(".")[0])
    # finite loss, poisoned gradient: only this layer's δ-gradient (and out-of-scope inputs) turn NaN
    module.register_forward_hook(lambda m, i, out: [out.register_hook(lambda g: g * float("nan")), None][1])
    with pytest.raises(FloatingPointError, match=rf"gradient of {name} at iteration 1"):
        run(ctx, penalty="l1", **FAST)


def test_noise_seeds_differ_per_tensor_step_and_sample():
    seeds = {noise_seed(0, s, k, i) for s in range(4) for k in range(2) for i in range(8)}
    assert len(seeds) == 64 and noise_seed(0, 1, 0, 2) == noise_seed(0, 1, 0, 2)


def test_float16_model_keeps_float32_state_and_loss_scale(gqa_groups, calibration_ids):
    """A float16 model is scored in float16 (no refusal, no float32 copy): δ and W' are float32, the backward
    loss-scaled; the scores track scoring a float32 copy of the same weights (docs/precision.md)."""
    wide = tiny_ctx(gqa_groups, calibration_ids)
    wide.model.half().float()
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    ctx.model.half()
    reference = torch.cat(run(wide, penalty="group", **FAST))
    scores = torch.cat(run(ctx, penalty="group", **FAST))
    assert ctx.info["moreau"]["loss_scale"]["enabled"]
    assert all(p.dtype == torch.float16 for p in ctx.model.parameters())
    assert float(torch.corrcoef(torch.stack([reference, scores]))[0, 1]) > 0.99


# -- the fused perturbed-Linear path against a plain in-place reference ------------------------------


def inplace_reference_salience(ctx: ScoringContext, o: MoreauOptions, seed: int) -> dict[str, torch.Tensor]:
    """Straightforward math-mode estimator: perturb the prunable weights in place, backprop, restore."""
    from prunekit.builtin.moreau import make_prox

    params = ctx.params()
    originals = {n: p.detach().clone() for n, p in params.items()}
    for n, p in ctx.model.named_parameters():
        p.requires_grad_(n in params)

    def grad_at(delta, step):
        for p in params.values():
            p.grad = None
        for sample in range(o.noise_samples):
            with torch.no_grad():
                for index, (n, p) in enumerate(params.items()):
                    w = originals[n]
                    gen = torch.Generator().manual_seed(noise_seed(seed, step, sample, index))
                    p.copy_(w + o.sigma * w * torch.randn(p.shape, generator=gen) + delta[n])
            for loss in ctx.iter_losses():
                loss.backward()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(originals[n])
        return {n: p.grad / o.noise_samples for n, p in params.items()}

    delta = {n: torch.zeros_like(p) for n, p in params.items()}
    prox = make_prox(o, ctx.groups)
    mean = proximal_descent(gradient_step(grad_at, o.step, o.rho), delta, prox, iterations=o.iterations,
                            averaged=o.averaged, on_first_step=Moreau._relative_eta(prox, o.eta_relative))
    for p in ctx.model.parameters():
        p.grad = None
    return {n: (mean[n] * originals[n]).abs() for n in params}


@pytest.mark.parametrize("options", [
    {"penalty": "group", "eta_relative": 0.5},
    {"penalty": "l1", "eta": 1e-3, "noise_samples": 2},
    {"penalty": "group", "sigma": 0.0, "eta": 0.0},
])
def test_fused_path_matches_in_place_reference(gqa_groups, calibration_ids, options):
    """Math mode without touching the weights must give the in-place perturbation's salience."""
    o = MoreauOptions(step=0.05, rho=0.2, sigma=options.pop("sigma", 0.05), **FAST, **options)
    ctx = tiny_ctx(gqa_groups, calibration_ids, seed=5)
    got = Moreau(o).salience(ctx)
    want = inplace_reference_salience(tiny_ctx(gqa_groups, calibration_ids, seed=5), o, seed=5)
    assert set(got) == set(want)
    for n in want:
        assert want[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6 * float(want[n].abs().max()))


def test_math_mode_never_writes_weights_or_grads(gqa_groups, calibration_ids, monkeypatch):
    """During every gradient call the parameters hold w exactly, get no .grad, and forwards are restored."""
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    seen = {"calls": 0}
    clean = ScoringContext.iter_losses

    def checked(self):
        for loss in clean(self):
            yield loss
            seen["calls"] += 1
            assert all(torch.equal(p, before[n]) and p.grad is None for n, p in self.model.named_parameters())

    monkeypatch.setattr(ScoringContext, "iter_losses", checked)
    run(ctx, penalty="group", **FAST)
    assert seen["calls"] == FAST["iterations"] * len(calibration_ids)
    assert all("forward" not in m.__dict__ for m in ctx.model.modules())
    assert ctx.info["moreau"]["state_bytes"] == 3 * 4 * ctx.info["moreau"]["scope_elements"]


def test_wrapped_linear_falls_back_to_in_place_perturbation(gqa_groups, calibration_ids):
    """A prunable Linear whose forward is already wrapped is perturbed in place; the scores agree."""
    fused_ctx = tiny_ctx(gqa_groups, calibration_ids)
    fused = run(fused_ctx, penalty="group", **FAST)
    ctx = tiny_ctx(gqa_groups, calibration_ids)
    module = ctx.model.get_submodule(list(ctx.params())[0].rpartition(".")[0])
    module.forward = module.forward  # an instance-level forward, as hooks and adapters install
    wrapped = run(ctx, penalty="group", **FAST)
    assert ctx.info["moreau"]["state_bytes"] == 4 * 4 * ctx.info["moreau"]["scope_elements"]
    assert "forward" in module.__dict__
    for a, b in zip(wrapped, fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("method", ["taylor", "moreau-gs-paper"])  # the gradient path, on the given batches
def test_micro_batches_give_the_gradient_of_one_batch(gqa_groups, calibration_ids, method):
    """Calibration batches only bound memory: 4 sequences as one batch, as 2+2 or as 3+1 score the same."""
    from prunekit.plugin.registry import get_registry

    entry = get_registry().method(method)
    everything = torch.cat(calibration_ids)
    splits = [[everything], list(everything.split(2)), [everything[:3], everything[3:]]]
    scores = []
    for batches in splits:
        ctx = ScoringContext(make_tiny_llama(8, 2), gqa_groups, batches, seed=3)
        options = entry.options(FAST if method.startswith("moreau") else {})
        scores.append(torch.cat(entry.cls(options).scores(ctx)))
    for other in scores[1:]:
        torch.testing.assert_close(other, scores[0], rtol=1e-4, atol=1e-6 * float(scores[0].abs().max()))


def test_perturbed_weights_do_not_depend_on_thread_count(gqa_groups, calibration_ids):
    """W' is built in parallel across tensors from per-tensor generators: 1 or 3 threads, same bits."""
    from prunekit.builtin.moreau import PerturbedStep, linear_modules

    ctx = tiny_ctx(gqa_groups, calibration_ids)
    modules = linear_modules(ctx.model, ctx.params())
    step = PerturbedStep(ctx, modules, sigma=0.05, seed=4, noise_samples=1, step=2e-4, rho=0.2)
    delta = {n: torch.full_like(m.weight, 0.01) for n, m in modules.items()}
    built = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        built.append(step.build(delta, t=2))
    torch.set_num_threads(1)
    assert all(torch.equal(built[0][n], built[1][n]) for n in modules)
    name, module = next(iter(modules.items()))
    assert not torch.equal(built[0][name], module.weight + 0.01)  # the noise is there
