"""The example plugin package (examples/prunekit-activation-methods), installed from its folder by
scripts/setup.sh and found only through its entry points: listed, run end to end, FLAP's compensation exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.cli import main
from prunekit.core.config import resolve_config
from prunekit.pipeline.stages import calibrate
from prunekit.plugin.registry import get_registry
from prunekit.plugin.testing import zero_removed_inputs

pytest.importorskip("prunekit_activation_methods", reason="scripts/setup.sh installs the example plugin package")

CONFIG = ("selection:\n  layers: [0, 4]\ncalibration:\n  n_samples: 4\n  seq_len: 16\n"
          "allocation:\n  name: uniform\n")  # every layer alike: uniform shapes, plain from_pretrained
PROVIDER = "prunekit-activation-methods"


def _calibrate(tokenizer, config):
    """A run's calibration batches and provenance, as the pipeline draws them."""
    return calibrate(tokenizer, config.calibration, seed=config.calibration_seed)


def _run(tiny_model_dir, tmp_path, method, *options):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / method
    assert main(["run", "--no-eval", "--method", method, "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(out), "--config", str(cfg), *options]) == 0
    return out, json.loads((out / "run.json").read_text())


def test_listed_through_the_entry_points(capsys):
    registry = get_registry()
    for method in ("wanda-sp", "flap"):
        assert registry.method(method).provider == PROVIDER
        assert registry.method(method).needs_calibration()
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "wanda-sp" in listing and "flap" in listing and PROVIDER in listing


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_runs_end_to_end_and_reloads(tiny_model_dir, tmp_path, method):
    out, manifest = _run(tiny_model_dir, tmp_path, method)
    assert manifest["method"]["provider"] == PROVIDER and manifest["calibration"]["n_samples"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)  # uniform shapes: plain from_pretrained, biases included
    assert model.num_parameters() == manifest["reduction"]["params_after"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(12).view(1, 12)).logits).all()


def test_flap_bias_is_the_removed_channels_mean_contribution(tiny_model_dir, tmp_path):
    """Pruned + compensated == original with removed input columns zeroed and W[:, R]·mean(X_R) added as bias."""
    from prunekit.adapters.grouping import GrouperOptions, build_groups
    from prunekit.adapters.llama import LlamaAdapter
    from prunekit.importance.base import ScoringContext

    out, manifest = _run(tiny_model_dir, tmp_path, "flap")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches, _ = _calibrate(tokenizer, resolve_config({"calibration": {"n_samples": 4, "seq_len": 16}}, {}))
    groups = build_groups(original, LlamaAdapter(original), range(4), GrouperOptions())
    stats = ScoringContext(original, groups, batches).activation_stats()
    kept = [torch.tensor(manifest["mask"][g.name]["kept"]) for g in groups]
    reference = copy.deepcopy(original)
    zero_removed_inputs(reference, groups, kept)
    with torch.no_grad():
        for g, keep in zip(groups, kept):
            s = next(s for s in g.slices if s.dim == 1)
            removed = torch.tensor(sorted(set(range(g.n_units)) - set(keep.tolist())))
            channels = g.channels_of(removed, s)
            w = original.get_submodule(s.module_name).weight.double()
            bias = (w[:, channels] @ stats[s.module_name].mean[channels]).float()
            reference.get_submodule(s.module_name).bias = torch.nn.Parameter(bias)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.mlp_bias and pruned.config.attention_bias
    ids = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    (tmp_path / "plain").mkdir()
    _, plain = _run(tiny_model_dir, tmp_path / "plain", "flap", "-o", "compensate=false")
    assert plain["method"]["info"]["flap"]["compensation"] is None
    assert plain["reduction"]["params_after"] < manifest["reduction"]["params_after"]  # no biases added


def test_flap_compensation_on_a_family_without_bias_flags_is_refused_in_one_line(tmp_path, capsys):
    """Qwen2 has no config flag that gives o_proj / down_proj a bias: FLAP's compensation could not be saved, so
    the run stops with one line naming ``compensate`` (exit 2), and ``compensate=false`` prunes."""
    from conftest import make_tiny_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "qwen2")
    make_tiny_tokenizer().save_pretrained(tmp_path / "qwen2")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    args = ["run", "--no-eval", "--method", "flap", "--ratio", "0.34", "--model", str(tmp_path / "qwen2"),
            "--config", str(cfg)]
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "compensate: false" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--output", str(tmp_path / "plain"), "-o", "compensate=false"]) == 0
