"""Output safety, seeds and broken-model checks as units: the swap, the lock, ownership, ratio rounding,
calibration seeds, and non-finite losses named by layer and step."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny_llama

import prunekit.io.safety as safety
from prunekit.core.config import resolve_config
from prunekit.errors import UserError
from prunekit.importance.base import ScoringContext, accumulate_gradients
from prunekit.importance.finite import check_weights_finite
from prunekit.io.export import atomic_directory
from prunekit.pipeline.stages import calibrate


def _calibrate(tokenizer, config):
    """A run's calibration batches and provenance, as the pipeline draws them."""
    return calibrate(tokenizer, config.calibration, seed=config.calibration_seed)


def _prunekit_dir(path, files=("model.safetensors",)):
    path.mkdir()
    for name in files:
        (path / name).write_text(name)
    (path / "run.json").write_text(json.dumps({"config": {}, "versions": {}, "files": list(files)}))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_swaps_and_removes_the_old_version(tmp_path, monkeypatch, exchange):
    out = tmp_path / "out"
    _prunekit_dir(out, ("a.txt",))
    if not exchange:  # the fallback where renameat2 is missing
        monkeypatch.setattr(safety, "_renameat2", lambda *a: (_ for _ in ()).throw(NotImplementedError))
    with atomic_directory(out, overwrite=True) as scratch:
        (scratch / "b.txt").write_text("new")
        assert (out / "a.txt").exists()  # the old output stays in place until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch, no .old, no lock
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_block_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    _prunekit_dir(out)
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as scratch:
        (scratch / "half").write_text("x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "run.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_never_replaces_an_output_that_appeared_meanwhile(tmp_path, monkeypatch):
    out, scratch = tmp_path / "out", tmp_path / ".out.partial-x"
    scratch.mkdir()
    (scratch / "new").write_text("new")
    out.mkdir()  # another run's output, created after this run looked
    (out / "theirs").write_text("theirs")
    real = os.path.lexists
    monkeypatch.setattr(safety.os.path, "lexists", lambda p: False if str(p) == str(out) else real(p))
    with pytest.raises(UserError, match="appeared while this run worked"):
        safety.publish(scratch, out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]


def test_atomic_directory_refuses_foreign_files_even_without_a_prior_check(tmp_path):
    out = tmp_path / "out"
    _prunekit_dir(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"did not write \(notes.txt\)"), atomic_directory(out, overwrite=True):
        pass
    assert (out / "notes.txt").read_text() == "mine"


def test_lock_is_exclusive_reentrant_and_released(tmp_path):
    out = tmp_path / "out"
    safety.claim(out)
    try:
        safety.claim(out)  # re-entrant in one process
        assert (tmp_path / ".out.lock").read_text() == str(os.getpid())
    finally:
        safety.release(out)
    assert not (tmp_path / ".out.lock").exists()


def test_stale_scratch_is_removed_only_for_its_own_output(tmp_path, capsys):
    for name in (".out.partial-abc", ".out.old-def", ".other.partial-x"):
        (tmp_path / name).mkdir()
    assert sorted(safety.claim(tmp_path / "out")) == [".out.old-def", ".out.partial-abc"]
    safety.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x"]
    assert "removed 2 folder(s)" in capsys.readouterr().err


def test_the_embedded_model_cache_is_protected(tmp_path, monkeypatch):
    from prunekit.io.export import check_output_dir

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models").mkdir(parents=True)
    with pytest.raises(UserError, match="lies inside the input model"):
        check_output_dir(tmp_path / "cache" / "models" / "out", overwrite=False, model_source=None)


def test_old_manifests_without_a_file_list_are_recognised(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": {}, "versions": {}}))
    (out / "model.safetensors").write_text("w")
    assert safety.foreign_entries(out) == []
    (out / "thesis.pdf").write_text("mine")
    (out / "notes.txt").write_text("mine")
    assert safety.foreign_entries(out) == ["notes.txt", "thesis.pdf"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(UserError, match="no permission to write"):
            safety.check_output(locked / "out", overwrite=False)
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------------------------ seeds


class _Tok:
    """Stands in for a tokenizer: one id per character."""

    def __call__(self, text, **_):
        return {"input_ids": [ord(c) % 96 for c in text]}


def test_run_seed_drives_calibration_unless_calibration_seed_is_set():
    tok = _Tok()
    a = _calibrate(tok, resolve_config({"seed": 1}, {}))[1]
    b = _calibrate(tok, resolve_config({"seed": 2}, {}))[1]
    assert (a["seed"], b["seed"]) == (1, 2) and a["starts"] != b["starts"]
    pinned = [_calibrate(tok, resolve_config({"seed": s, "calibration": {"seed": 5}}, {}))[1] for s in (1, 2)]
    assert pinned[0]["starts"] == pinned[1]["starts"] and pinned[0]["seed"] == 5


def test_seed_changes_a_taylor_mask(tiny_model_dir, tmp_path):
    from prunekit.cli import main

    masks = []
    for seed in (1, 2):
        out = tmp_path / f"out{seed}"
        cfg = tmp_path / "c.yaml"
        cfg.write_text("selection:\n  layers: [0, 4]\ncalibration:\n  n_samples: 2\n  seq_len: 16\n")
        assert main(["run", "--no-eval", "--method", "taylor", "--model", str(tiny_model_dir), "--output", str(out),
                     "--seed", str(seed), "--config", str(cfg)]) == 0
        manifest = json.loads((out / "run.json").read_text())
        assert manifest["seeds"] == {"run": seed, "calibration": seed}
        masks.append(manifest["mask"])
    assert masks[0] != masks[1]


# ------------------------------------------------------------------------------------- broken models


def test_nan_weight_is_named():
    model = make_tiny_llama(4, 4, layers=2)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"model.layers.1.self_attn.k_proj.weight holds 1 NaN"):
        check_weights_finite(model)
    check_weights_finite(make_tiny_llama(4, 4, layers=2))


def test_non_finite_loss_names_the_batch_and_the_layer():
    from prunekit.adapters.grouping import GrouperOptions
    from prunekit.plugin.registry import get_registry

    model = make_tiny_llama(4, 4, layers=3)
    registry = get_registry()
    groups = registry.named("groupers", "blocks").impl(model, registry.adapter_for(model), range(0, 3),
                                                       GrouperOptions())
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(3e38)  # finite weights whose products overflow
    batches = [torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ctx = ScoringContext(model=model, groups=groups, batches=batches)
    with pytest.raises(FloatingPointError, match=r"batch 1 of 2; first non-finite output: model.layers.1.mlp.up_proj"):
        accumulate_gradients(ctx)


@pytest.mark.parametrize("unit,ratio,expect", [
    ("kv_groups", 0.1, "removes no kv_group from the attention of 4 layer(s)"),
    ("heads", 0.9, "would empty the attention of 4 layer(s); one unit per KV group is kept"),
])
def test_ratio_rounding_is_reported_never_silent(unit, ratio, expect, capsys):
    from prunekit.adapters.grouping import GrouperOptions
    from prunekit.pipeline.checks import check_ratio
    from prunekit.plugin.registry import get_registry

    model = make_tiny_llama(9, 3, layers=4)
    registry = get_registry()
    groups = registry.named("groupers", "blocks").impl(model, registry.adapter_for(model), range(0, 4),
                                                       GrouperOptions(attention_unit=unit))
    notes = check_ratio(groups, resolve_config({"ratio": ratio, "grouper": {"attention_unit": unit}}, {}))
    assert any(expect in n for n in notes), notes
    assert expect in capsys.readouterr().err


def test_eval_json_is_written_whole_with_plain_permissions(tmp_path):
    from prunekit.cli.failures import write_json_atomically

    target = tmp_path / "m.json"
    write_json_atomically(target, {"ppl": 1.5})
    assert json.loads(target.read_text()) == {"ppl": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_saved_model_files_have_the_permissions_of_the_other_files(tmp_path):
    """safetensors writes 0600; every saved file must get what a plain open() gives (colleagues can read it)."""
    from prunekit.io.export import save_pruned

    out = tmp_path / "out"
    save_pruned(make_tiny_llama(4, 2), None, out, {"config": {}})
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes
    umask = os.umask(0)
    os.umask(umask)
    assert modes["run.json"] == 0o666 & ~umask and (out.stat().st_mode & 0o777) == 0o777 & ~umask
