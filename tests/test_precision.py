"""Scoring in the model's own dtype: bf16/fp16 scores against float32 scoring, fp16 loss scaling, the
``compute_dtype: float32`` path and the caller's model coming back untouched (docs/precision.md)."""

from __future__ import annotations

import copy

import pytest
import torch

import prunekit.importance.precision as precision
from prunekit import api
from prunekit.errors import UserError
from prunekit.importance.precision import GradAccumulator, LossScale
from prunekit.pipeline.stability import agreement
from prunekit.plugin.testing import tiny_batches, tiny_llama, tiny_sampler

# Documented tolerance (docs/precision.md): bf16-model scores against float32 scoring of the same weights.
METHODS = {"taylor": {}, "fisher": {}, "moreau": {}, "moreau-gs": {}}
MIN_CORRELATION = 0.99
MIN_REMOVED_IOU = 0.8


def _corr(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(torch.corrcoef(torch.stack([torch.cat(a), torch.cat(b)]))[0, 1])


def _iou(groups, a, b) -> float:
    return agreement(groups, [api.select(groups, a, 0.25), api.select(groups, b, 0.25)])["removed_iou"]


def _state(model):
    return {n: (p.detach().clone(), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()}


def _assert_same_state(model, before) -> None:
    for n, p in model.named_parameters():
        weight, dtype, device, requires_grad = before[n]
        assert p.dtype == dtype and p.device == device and p.requires_grad == requires_grad, n
        assert torch.equal(p.detach(), weight), n
        assert p.grad is None, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_low_precision_scores_track_float32_scoring(one_thread, method, dtype):
    """Same weights, scored in their own dtype vs cast to float32: scores correlate, masks overlap."""
    model = tiny_llama().to(dtype)
    model.lm_head.weight.requires_grad_(False)  # a mixed requires_grad state must come back as it was
    groups = api.build_groups(model, (0, 3))
    batches = tiny_batches()
    before = _state(model)
    reference, _ = api.score(model, groups, method, batches, options=METHODS[method], compute_dtype="float32",
                             sampler=tiny_sampler(batches))
    _assert_same_state(model, before)
    scores, info = api.score(model, groups, method, batches, options=METHODS[method], sampler=tiny_sampler(batches))
    _assert_same_state(model, before)
    assert info["precision"] == {"compute_dtype": str(dtype).removeprefix("torch."), "cast": False,
                                 "accumulators": "float32"}
    assert _corr(reference, scores) >= MIN_CORRELATION
    assert _iou(groups, reference, scores) >= MIN_REMOVED_IOU
    assert all(s.dtype == torch.float32 and torch.isfinite(s).all() and (s > 0).any() for s in scores)


@pytest.mark.parametrize("method", ["taylor", "fisher", "moreau-gs", "moreau-gs-reference", "magnitude"])
def test_compute_float32_is_bit_identical_to_a_float32_model(one_thread, method):
    """``compute_dtype: float32`` on a bf16 model = scoring its float32 copy (today's path), bit for bit;
    on a float32 model the default and ``float32`` are the same thing."""
    model = tiny_llama().to(torch.bfloat16)
    groups = api.build_groups(model, (0, 3))
    batches = tiny_batches()
    before = _state(model)
    cast, _ = api.score(model, groups, method, batches, compute_dtype="float32", sampler=tiny_sampler(batches))
    _assert_same_state(model, before)
    wide = copy.deepcopy(model).float()
    native, _ = api.score(wide, groups, method, batches, sampler=tiny_sampler(batches))
    explicit, _ = api.score(wide, groups, method, batches, compute_dtype=torch.float32, sampler=tiny_sampler(batches))
    assert all(torch.equal(a, b) for a, b in zip(cast, native))
    assert all(torch.equal(a, b) for a, b in zip(native, explicit))


def _underflowing_fp16_model():
    """A tiny model whose float16 weight gradients underflow to zero unscaled (logit scale 1e-5)."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e-5)
    return model.half()


@pytest.mark.parametrize("method", ["taylor", "fisher", "moreau-gs"])
def test_fp16_underflow_is_loss_scaled(one_thread, method):
    model = _underflowing_fp16_model()
    groups = api.build_groups(model, (0, 3))
    batches = tiny_batches()
    reference, _ = api.score(model, groups, method, batches, compute_dtype="float32", sampler=tiny_sampler(batches))
    scores, info = api.score(model, groups, method, batches, sampler=tiny_sampler(batches))
    scale = info["loss_scale"] if "loss_scale" in info else info["moreau"]["loss_scale"]
    assert scale["enabled"] and scale["final"] >= 1024
    assert sum(int((s > 0).sum()) for s in scores) == sum(int((r > 0).sum()) for r in reference) > 0
    assert _corr(reference, scores) >= MIN_CORRELATION


def test_fp16_underflow_without_scaling_is_refused_not_zero(one_thread, monkeypatch):
    """With the scale pinned to 1 the same gradients are all zero: an error, never silent zero scores."""
    monkeypatch.setattr(precision, "INITIAL_LOSS_SCALE", 1.0)
    model = _underflowing_fp16_model()
    groups = api.build_groups(model, (0, 3))
    with pytest.raises(FloatingPointError, match="underflow"):
        api.score(model, groups, "taylor", tiny_batches())


def test_fp16_overflow_backs_off_and_redoes_the_pass(one_thread, monkeypatch):
    """A loss scale that overflows float16 is halved until the pass is finite; scores match float32 scoring."""
    monkeypatch.setattr(precision, "INITIAL_LOSS_SCALE", 2.0 ** 40)
    model = tiny_llama().half()
    groups = api.build_groups(model, (0, 3))
    batches = tiny_batches()
    reference, _ = api.score(model, groups, "taylor", batches, compute_dtype="float32")
    scores, info = api.score(model, groups, "taylor", batches)
    assert info["loss_scale"]["backoffs"] >= 1 and info["loss_scale"]["final"] < 2.0 ** 40
    assert _corr(reference, scores) >= MIN_CORRELATION


def test_accumulator_sums_low_precision_grads_in_float32():
    """Each bf16 .grad is added into a float32 buffer on the weight's device and freed during backward."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    seen_grad_during = []
    with GradAccumulator({"w": w}, LossScale(False)) as acc:
        for _ in range(300):  # 300 x 2**-9: a bf16 running sum would stall at 2**-9 * 256 (its mantissa)
            (w.float() * 2.0 ** -9).sum().backward()
            seen_grad_during.append(w.grad)
    sums = acc.result()
    assert sums["w"].dtype == torch.float32 and sums["w"].device == w.device
    assert torch.equal(sums["w"], torch.full((4,), 300 * 2.0 ** -9))
    assert all(g is None for g in seen_grad_during)


def test_compute_dtype_names():
    assert precision.resolve_compute_dtype("model") is None
    assert precision.resolve_compute_dtype(None) is None
    assert precision.resolve_compute_dtype("float32") is torch.float32
    with pytest.raises(UserError, match="compute_dtype"):
        precision.resolve_compute_dtype("fp8")


def test_prune_records_compute_dtype(one_thread):
    """A bf16 model pruned with the default scores in bf16; run.json says so and the model stays bf16."""
    model = tiny_llama().to(torch.bfloat16)
    result = api.prune(model, method="taylor", ratio=0.34, layers=(0, 3), batches=tiny_batches())
    manifest = result.manifest()
    assert manifest["config"]["compute_dtype"] == "model"
    assert manifest["method"]["info"]["precision"]["compute_dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    wide = tiny_llama().to(torch.bfloat16)
    forced = api.prune(wide, method="taylor", ratio=0.34, layers=(0, 3), batches=tiny_batches(),
                       compute_dtype="float32")
    assert forced.manifest()["method"]["info"]["precision"] == {"compute_dtype": "float32", "cast": True,
                                                                "accumulators": "float32"}
    assert all(p.dtype == torch.bfloat16 for p in wide.parameters())


@pytest.mark.study
@pytest.mark.parametrize("method", ["taylor", "moreau-gs"])
def test_memory_benchmark_runs_on_a_tiny_shape(one_thread, method):
    """The precision benchmark's memory probe (the code path the GPU run takes, here with --device cpu)."""
    from prunekit.benchmarks.studies.precision import measure_memory

    tiny = {"vocab_size": 96, "hidden_size": 72, "intermediate_size": 48, "num_hidden_layers": 4,
            "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 8, "tie_word_embeddings": True}
    row = measure_memory(method, "bfloat16", "model", "cpu", 1, n_samples=4, seq_len=8, shape=tiny)
    assert row["finite"] and row["model_bytes"] > row["prunable_bytes"] > 0
    assert row["peak_above_model_bytes"] >= 0 and row["probe"]
