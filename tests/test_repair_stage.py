"""The repair stage: a registered repair runs after pruning and before recovery, sees the dense copy it asks
for and seeded repair text, and is recorded in run.json; a bad name or option fails before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from pydantic import BaseModel, ConfigDict

import prunekit
from prunekit import hookimpl
from prunekit.cli import main
from prunekit.errors import UserError
from prunekit.plugin.host import get_host

SEEN: dict = {}


class Recorder:
    """Records what the stage hands it and scales the last layer's down_proj (a visible, checkable change)."""

    needs_dense = True

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scale: float = 1.0
        n_samples: int = 2

    def __init__(self, options):
        self.options = options

    def repair(self, ctx) -> dict:
        down = ctx.model.model.layers[-1].mlp.down_proj
        SEEN.update(dense_width=ctx.dense.model.layers[-1].mlp.down_proj.in_features, pruned_width=down.in_features,
                    kept=[k.clone() for k in ctx.kept], batches=ctx.calibration(self.options.n_samples, 8),
                    dense_grad=any(p.requires_grad for p in ctx.dense.parameters()))
        with torch.no_grad():
            down.weight.mul_(self.options.scale)
        return {"scaled": self.options.scale}


class RecorderPlugin:
    @hookimpl
    def prunekit_register_repairers(self, register):
        register("recorder", Recorder)


@pytest.fixture
def recorder():
    host = get_host()
    host.pm.register(RecorderPlugin(), name="recorder-plugin")
    SEEN.clear()
    yield
    host.pm.unregister(name="recorder-plugin")


def test_repair_runs_after_pruning_with_the_dense_copy_and_seeded_text(recorder):
    model, tokenizer = make_tiny_llama(4, 2, layers=3), make_tiny_tokenizer()
    before = model.model.layers[-1].mlp.down_proj.weight.clone()
    result = prunekit.prune(model, tokenizer, method="magnitude", ratio=0.5, layers=(0, 3),
                            allocation={"name": "uniform"}, repair={"name": "recorder", "options": {"scale": 0.5}})
    assert SEEN["dense_width"] == 48 and SEEN["pruned_width"] == 24 and not SEEN["dense_grad"]
    kept = result.kept[-1]  # the last group: layer 2's MLP channels
    assert torch.equal(model.model.layers[-1].mlp.down_proj.weight, 0.5 * before[:, kept])
    assert len(SEEN["batches"]) == 1 and SEEN["batches"][0].shape == (2, 8)
    assert result.manifest()["repair"] == {"name": "recorder", "provider": "recorder-plugin",
                                           "options": {"scale": 0.5, "n_samples": 2}, "info": {"scaled": 0.5}}
    assert "repair" in result.timings


def test_no_repair_by_default_is_recorded_as_none():
    result = prunekit.prune(make_tiny_llama(4, 2), None, method="magnitude", allocation={"name": "uniform"})
    assert result.manifest()["repair"] == {"name": "none"} and "repair" not in result.timings


@pytest.mark.parametrize("repair, field", [({"name": "nope"}, "unknown name 'nope'"),
                                           ({"name": "recorder", "options": {"scale": "x"}}, "repair.options.scale"),
                                           ({"name": "recorder", "options": {"typo": 1}}, "repair.options.typo")])
def test_a_bad_repair_fails_before_the_model_is_touched(recorder, repair, field):
    model = make_tiny_llama(4, 2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=field):
        prunekit.prune(model, make_tiny_tokenizer(), method="magnitude", allocation={"name": "uniform"}, repair=repair)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_cli_repair_flag_is_recorded_in_run_json(recorder, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--no-eval", "--method", "magnitude", "--allocator", "uniform", "--repair", "recorder",
                 "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["repair"]["name"] == "recorder" and manifest["config"]["repair"]["name"] == "recorder"
    assert "repair" in manifest["timings"]


@pytest.mark.parametrize("name", ["refit", "bias"])
def test_builtin_repairs_lower_the_pruned_models_loss_and_reload(name, tmp_path, one_thread):
    """``repair: refit`` / ``bias`` through prunekit.prune on a tiny model: the calibration loss of the pruned model
    falls, run.json says what was fitted, and the saved checkpoint reloads with the repaired weights."""
    from prunekit.data.sources import calibration_batches
    from prunekit.eval.perplexity import window_nll

    tokenizer = make_tiny_tokenizer()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the market price of the stock rose and the company said it would buy shares"] * 40))
    held, _ = calibration_batches(tokenizer, source=str(text), n_samples=4, seq_len=16, seed=99)
    options = {"source": str(text), "n_samples": 8, "seq_len": 16}
    losses = {}
    for repair in ("none", name):
        model = make_tiny_llama(4, 2, layers=3)
        result = prunekit.prune(model, tokenizer, method="magnitude", ratio=0.5, layers=(0, 3),
                                allocation={"name": "uniform"},
                                repair={"name": repair, **({"options": options} if repair != "none" else {})})
        with torch.no_grad():
            losses[repair] = window_nll(model, held)[0]
    assert losses[name] < losses["none"]
    record = result.manifest()["repair"]
    assert record["name"] == name and record["options"]["source"] == str(text)
    prunekit.save(result, tmp_path / "out")
    reloaded = prunekit.load_pruned(tmp_path / "out")
    with torch.no_grad():
        assert abs(window_nll(reloaded, held)[0] - losses[name]) < 1e-3 * abs(losses[name])
