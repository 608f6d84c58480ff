"""The command line as a user meets it: runs, listings, and one-line errors with exit code 2."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit import hookimpl
from prunekit.cli import main
from prunekit.importance.base import Importance
from prunekit.io.export import load_pruned
from prunekit.plugin.host import get_host

RUN = ["run", "--no-eval", "--ratio", "0.34"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``prunekit ARGS`` in this process (``main(argv)``), its exit code and output as a finished process's."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["prunekit", *args], code, out.getvalue(), err.getvalue())


@pytest.mark.subprocess
def test_the_installed_entry_point_reports_bad_input_in_one_line(tiny_model_dir, tmp_path):
    """The real process: ``python -m prunekit.cli`` exits 2 with one line on stderr and no traceback."""
    done = subprocess.run([sys.executable, "-m", "prunekit.cli", *RUN, "--model", str(tiny_model_dir), "--output",
                           str(tmp_path / "o"), "--ratio", "2"], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "ratio" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["magnitude", "random", "taylor"])
def test_run_writes_loadable_model_and_manifest(tiny_model_dir, tmp_path, method):
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    args = [*RUN, "--method", method, "--model", str(tiny_model_dir), "--output", str(out), "--config", str(
        _write(tmp_path / "c.yaml", "selection:\n  layers: [0, 4]\ncalibration:\n  n_samples: 4\n  seq_len: 16\n"
                                    "allocation:\n  name: uniform\n"))]
    assert main(args) == 0
    manifest = json.loads((out / "run.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)  # uniform shapes: plain from_pretrained
    for name, entry in manifest["mask"].items():
        layer = model.model.layers[entry["layer"]]
        if name.endswith("mlp"):
            assert layer.mlp.gate_proj.out_features == len(entry["kept"])
        else:
            assert layer.self_attn.q_proj.out_features == len(entry["kept"]) * 8
    r = manifest["reduction"]
    assert r["params_after"] == model.num_parameters() < r["params_before"]
    assert manifest["versions"]["torch-pruning"] and manifest["method"]["name"] == method
    assert set(manifest["timings"]) >= {"load", "groups", "score", "select", "prune"}
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()} == before  # input untouched


def test_default_layer_range_gives_per_layer_shapes(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    cfg = _write(tmp_path / "c.toml", "[selection]\nlayers = [1, 3]\n")
    assert main([*RUN, "--method", "magnitude", "--model", str(tiny_model_dir), "--output", str(out),
                 "--config", str(cfg)]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert not manifest["uniform_shapes"]
    assert json.loads((out / "config.json").read_text())["auto_map"] and (out / "modeling_prunekit.py").is_file()
    model = load_pruned(out)
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert model.num_parameters() == manifest["reduction"]["params_after"]


def test_methods_and_plugins_listings(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in ("magnitude", "random", "taylor", "variant", "p=2"):
        assert name in listing
    assert main(["plugins"]) == 0
    plugins = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in plugins}
    assert {"magnitude", "taylor", "random", "llama"} <= names
    assert all("hooks" in p or "error" in p for p in plugins)


class Reverse(Importance):
    """Throw-away test method: keeps the highest-indexed units."""

    def scores(self, ctx):
        return [torch.arange(g.n_units, dtype=torch.float32) for g in ctx.groups]


class ThrowAwayPlugin:
    @hookimpl
    def prunekit_register_importances(self, register):
        register("reverse", Reverse)


@pytest.fixture
def throwaway_plugin():
    host = get_host()
    host.pm.register(ThrowAwayPlugin(), name="throwaway")
    yield
    host.pm.unregister(name="throwaway")


def test_throwaway_plugin_runs_through_prunekit_run(throwaway_plugin, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main([*RUN, "--method", "reverse", "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["method"]["provider"] == "throwaway"
    mlp = next(v for k, v in manifest["mask"].items() if k.endswith("mlp"))
    assert mlp["kept"] == list(range(mlp["n_units"] - len(mlp["kept"]), mlp["n_units"]))


def test_duplicate_method_name_is_refused(tiny_model_dir, tmp_path, capsys):
    class Dup:
        @hookimpl
        def prunekit_register_importances(self, register):
            register("taylor", Reverse)

    host = get_host()
    host.pm.register(Dup(), name="dup")
    try:
        assert main([*RUN, "--method", "taylor", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o")]) == 2
    finally:
        host.pm.unregister(name="dup")
    assert "registered by both" in capsys.readouterr().err


def test_options_are_validated(tiny_model_dir, tmp_path, capsys):
    assert main([*RUN, "--method", "taylor", "-o", "variant=third", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "o")]) == 2
    assert "method_options.variant" in capsys.readouterr().err
    assert main([*RUN, "--method", "taylor", "-o", "nonsense=1", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "o")]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("args,expected", [
    (["--method", "nope"], "available: "),
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0"], "ratio"),
    (["--config", "missing.yaml"], "file not found"),
])
def test_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, args, expected):
    result = run_cli(*RUN, "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), *args)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_errors(tiny_model_dir, tmp_path):
    bad_yaml = _write(tmp_path / "bad.yaml", "ratio: [0.2\n")
    unknown = _write(tmp_path / "unknown.yaml", "ratoi: 0.2\n")
    layers = _write(tmp_path / "layers.yaml", "selection:\n  layers: [0, 99]\n")
    for cfg, expected in ((bad_yaml, "malformed"), (unknown, "ratoi"), (layers, "outside the model")):
        result = run_cli(*RUN, "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--config", str(cfg))
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_plugin_evaluator_is_refused_before_any_work(tiny_model_dir, tmp_path):
    cfg = _write(tmp_path / "e.yaml", "evaluation:\n  evaluators:\n    nope: {}\n")
    result = run_cli("run", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--config", str(cfg))
    assert result.returncode == 2 and "evaluators: unknown name 'nope'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    from conftest import make_tiny_tokenizer

    make_tiny_tokenizer(64).save_pretrained(tmp_path / "gpt2")
    result = run_cli(*RUN, "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "unsupported architecture 'gpt2'" in result.stderr and "llama" in result.stderr


def test_nonempty_output_needs_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run_cli(*RUN, "--method", "magnitude", "--model", str(tiny_model_dir), "--output", str(out))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    # --overwrite replaces only a previous prunekit output, never a folder holding the user's files
    args = [*RUN, "--method", "magnitude", "--model", str(tiny_model_dir), "--output", str(out), "--overwrite"]
    assert main(args) == 2 and (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    assert main(args) == 0 and (out / "run.json").exists()
    first = (out / "run.json").read_text()
    assert main([*args, "--seed", "7"]) == 0
    assert (out / "run.json").read_text() != first and json.loads((out / "run.json").read_text())["seed"] == 7


def test_failed_run_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import prunekit.io.safety

    def explode(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prunekit.io.safety, "publish", explode)  # everything written, then the last step fails
    assert main([*RUN, "--method", "magnitude", "--model", str(tiny_model_dir), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: disk full" in err and "PRUNEKIT_DEBUG" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
