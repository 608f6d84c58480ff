"""The public Python API on tiny models held in memory: prune, evaluate, save (and the CLI built on them)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

import prunekit
from prunekit import hookimpl
from prunekit.cli import main
from prunekit.errors import UserError
from prunekit.plugin.host import get_host

TINY_CALIBRATION = {"n_samples": 4, "seq_len": 16}


def _state(model):
    return ({n: (p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()},
            {n: b.dtype for n, b in model.named_buffers()}, model.training)


def test_prune_in_memory_keeps_dtype_device_and_grad_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_tiny_llama(9, 3).to(torch.bfloat16).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("norm.weight"))  # a mix the caller chose
    state = _state(model)
    result = prunekit.prune(model, make_tiny_tokenizer(), method="taylor", ratio=0.34, layers=(0, 4),
                            calibration=TINY_CALIBRATION, allocation={"name": "uniform"})  # every group shrinks
    assert isinstance(result, prunekit.PruneResult) and result.model is model
    assert _state(model) == state  # float32 scoring and the pruning surgery are invisible to the caller
    assert all(p.grad is None for p in model.parameters())
    for name, entry in result.mask.items():
        layer = model.model.layers[entry["layer"]]
        width = layer.mlp.gate_proj.out_features if name.endswith("mlp") else layer.self_attn.q_proj.out_features // 8
        assert width == len(entry["kept"]) < entry["n_units"]
    r = result.reduction
    assert r["params_after"] == model.num_parameters() < r["params_before"]
    assert result.method.name == "taylor" and result.method.provider and result.method.options["variant"]
    assert result.uniform_shapes and set(result.timings) >= {"groups", "calibrate", "score", "select", "prune"}
    assert not any(tmp_path.iterdir())  # nothing written
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(12).view(1, 12)).logits).all()


def test_prune_with_own_batches_needs_no_tokenizer():
    model = make_tiny_llama(4, 2)
    batches = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    a = prunekit.prune(model, None, method="taylor", ratio=0.25, batches=batches, layers=(1, 3))
    b = prunekit.prune(make_tiny_llama(4, 2), None, method="taylor", ratio=0.25, batches=batches, layers=(1, 3))
    assert a.mask == b.mask and a.calibration is None and a.layers == range(1, 3)
    with pytest.raises(UserError, match="tokenizer"):
        prunekit.prune(make_tiny_llama(4, 2), None, method="taylor")


@pytest.mark.parametrize("kwargs,expected", [
    ({"ratio": 1.5}, "ratio"),
    ({"variant": "third"}, "method_options.variant"),
    ({"nonsense": 1}, "nonsense"),
    ({"calibration": {"n_samplez": 3}}, "calibration.n_samplez"),
    ({"selection": {"scope": "everywhere"}}, "selection.scope"),
    ({"layers": (0, 99)}, "outside the model"),
    ({"method": "nope"}, "available: "),
])
def test_prune_refuses_bad_input_before_touching_the_model(kwargs, expected):
    model = make_tiny_llama(4, 4)
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(UserError, match=expected):
        prunekit.prune(model, make_tiny_tokenizer(), **{"method": "taylor", **kwargs})
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())


class Recorder:
    """Throw-away observer of the lifecycle hooks."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def prunekit_after_scoring(self, context, scores):
        self.calls.append(("scoring", len(context.groups), len(scores)))

    @hookimpl
    def prunekit_after_pruning(self, context, model):
        self.calls.append(("pruning", len(context.kept), model.num_parameters()))


def test_lifecycle_hooks_fire_for_the_api():
    recorder, host = Recorder(), get_host()
    host.pm.register(recorder, name="recorder")
    try:
        result = prunekit.prune(make_tiny_llama(4, 4), None, method="magnitude", ratio=0.25)
    finally:
        host.pm.unregister(name="recorder")
    n = len(result.groups)
    assert recorder.calls == [("scoring", n, n), ("pruning", n, result.reduction["params_after"])]


def test_cli_run_is_the_api(tiny_model_dir, tmp_path):
    """`prunekit run` and `prunekit.prune` on the same model and settings keep the same units."""
    out = tmp_path / "out"
    (tmp_path / "c.yaml").write_text("calibration:\n  n_samples: 4\n  seq_len: 16\n")
    assert main(["run", "--no-eval", "--method", "taylor", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(out), "--config", str(tmp_path / "c.yaml")]) == 0
    cli = json.loads((out / "run.json").read_text())
    model, tokenizer, _ = prunekit.load_model(str(tiny_model_dir))
    result = prunekit.prune(model, tokenizer, method="taylor", ratio=0.34, calibration=TINY_CALIBRATION)
    assert result.mask == cli["mask"] and result.reduction == cli["reduction"]
    assert result.calibration == cli["calibration"] and result.layer_shapes == cli["layer_shapes"]


def test_save_writes_the_cli_files_and_refuses_a_full_directory(tmp_path):
    model, tokenizer = make_tiny_llama(9, 3), make_tiny_tokenizer()
    result = prunekit.prune(model, tokenizer, method="magnitude", ratio=0.34, layers=(0, 4),
                            allocation={"name": "uniform"})  # every layer alike: plain from_pretrained reloads it
    out = prunekit.save(result, tmp_path / "out", metrics={"after": {"note": 1.0}})
    manifest = json.loads((out / "run.json").read_text())
    assert set(manifest) >= {"config", "model_source", "method", "versions", "seed", "calibration", "layers_pruned",
                             "recovery", "reduction", "layer_shapes", "uniform_shapes", "mask", "metrics", "timings"}
    assert manifest["mask"] == result.mask and manifest["metrics"] == {"after": {"note": 1.0}}
    assert manifest["config"]["method"] == "magnitude" and manifest["config"]["ratio"] == 0.34
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(UserError, match="overwrite"):
        prunekit.save(result, out)
    prunekit.save(result, out, overwrite=True)


def test_evaluate_in_memory_with_standard_errors_and_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    model, tokenizer = make_tiny_llama(4, 2), make_tiny_tokenizer()
    metrics = prunekit.evaluate(model, tokenizer, perplexity=["ptb"], ppl_window=16, ppl_max_windows=5, zero_shot=[])
    ptb = metrics["perplexity"]["ptb"]
    assert ptb["n_windows"] == 5 and ptb["window_selection"]["method"] == "evenly spaced"
    assert ptb["ppl_stderr"] > 0 and ptb["ppl"] > 1
    assert not any(tmp_path.iterdir())  # no cache unless asked
    with pytest.raises(UserError, match="evaluation.ppl_windw"):
        prunekit.evaluate(model, tokenizer, ppl_windw=3)
    with pytest.raises(UserError, match="evaluation.zero_shot"):
        prunekit.evaluate(model, tokenizer, zero_shot=["mmlu"])


def test_evaluate_cache_hits_for_the_same_model_and_misses_after_a_change(tmp_path):
    model, tokenizer = make_tiny_llama(4, 2), make_tiny_tokenizer()
    spec = {"perplexity": ["ptb"], "ppl_window": 16, "ppl_max_windows": 3, "zero_shot": []}
    first = prunekit.evaluate(model, tokenizer, spec, cache=True, cache_dir=tmp_path)
    second = prunekit.evaluate(make_tiny_llama(4, 2), tokenizer, spec, cache=True, cache_dir=tmp_path)
    assert not first["cache"]["hit"] and second["cache"]["hit"]
    assert second["perplexity"] == first["perplexity"]
    other_settings = prunekit.evaluate(model, tokenizer, {**spec, "ppl_max_windows": 4}, cache=True, cache_dir=tmp_path)
    assert not other_settings["cache"]["hit"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    changed = prunekit.evaluate(model, tokenizer, spec, cache=True, cache_dir=tmp_path)
    assert not changed["cache"]["hit"] and changed["perplexity"]["ptb"]["ppl"] != first["perplexity"]["ptb"]["ppl"]
    assert prunekit.evaluate(model, tokenizer, spec, cache=True, refresh=True,
                             cache_dir=tmp_path)["cache"]["hit"] is False


def test_evaluate_is_the_api_function():
    """``prunekit.evaluate`` is a plain function (no module trick); the evaluation code lives in ``prunekit.eval``."""
    from prunekit.eval.suite import evaluate

    assert prunekit.evaluate is evaluate and prunekit.api.evaluate is evaluate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prune_on_cuda_in_half_precision():
    model = make_tiny_llama(9, 3).to("cuda", torch.float16)
    state = _state(model)
    result = prunekit.prune(model, make_tiny_tokenizer(), method="taylor", ratio=0.34, calibration=TINY_CALIBRATION)
    assert _state(model) == state and result.reduction["params_after"] < result.reduction["params_before"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(12, device="cuda").view(1, 12)).logits).all()
