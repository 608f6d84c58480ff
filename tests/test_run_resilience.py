"""`prunekit run` never throws work away, reuses the dense metrics, and names only flags that exist."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from prunekit import hookimpl
from prunekit.cli import main
from prunekit.io.export import load_pruned
from prunekit.plugin.host import get_host

ROOT = Path(__file__).resolve().parent.parent
CALLS: list[int] = []


class Probe:
    """An evaluator plugin that counts its calls and fails (or is interrupted) on the pruned model when told."""

    fail_with: BaseException | None = None

    @hookimpl
    def prunekit_register_evaluators(self, register):
        def probe(model, tokenizer, options):
            CALLS.append(model.num_parameters())
            if self.fail_with is not None and len(CALLS) > 1 and CALLS[-1] < CALLS[0]:
                raise self.fail_with
            return {"params": float(model.num_parameters())}

        register("probe", probe)


@pytest.fixture
def probe(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    CALLS.clear()
    plugin = Probe()
    get_host().pm.register(plugin, name="probe")
    yield plugin
    get_host().pm.unregister(name="probe")


def _run(tiny_model_dir, tmp_path, out: str, *extra: str) -> int:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("evaluation:\n  perplexity: []\n  zero_shot: []\n  evaluators:\n    probe: {}\n")
    return main(["run", "--method", "magnitude", "--model", str(tiny_model_dir), "--output", str(tmp_path / out),
                 "--config", str(cfg), *extra])


@pytest.mark.parametrize("error,code", [(RuntimeError("evaluator exploded"), 1), (KeyboardInterrupt(), 130)])
def test_a_failed_after_evaluation_still_saves_the_pruned_model(probe, tiny_model_dir, tmp_path, capsys, error, code):
    probe.fail_with = error
    assert _run(tiny_model_dir, tmp_path, "out") == code
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    failure = manifest["errors"]["evaluate_after"]
    assert failure["type"] == type(error).__name__ and failure["stage"] == "evaluate_after"
    assert "before" in manifest["metrics"] and "after" not in manifest["metrics"]
    assert load_pruned(tmp_path / "out").num_parameters() == manifest["reduction"]["params_after"]
    err = capsys.readouterr().err
    assert "the pruned model was saved to" in err and "Traceback" not in err


def test_second_run_reuses_the_dense_metrics_unless_told_not_to(probe, tiny_model_dir, tmp_path, capsys):
    assert _run(tiny_model_dir, tmp_path, "a") == 0 and len(CALLS) == 2  # before + after
    assert _run(tiny_model_dir, tmp_path, "b") == 0 and len(CALLS) == 3  # before read from the cache
    first, second = (json.loads((tmp_path / o / "run.json").read_text())["metrics"] for o in "ab")
    assert not first["before"]["cache"]["hit"] and second["before"]["cache"]["hit"]
    assert second["before"]["evaluators"] == first["before"]["evaluators"]
    assert "reused from the cache" in capsys.readouterr().out
    assert _run(tiny_model_dir, tmp_path, "c", "--no-eval-cache") == 0 and len(CALLS) == 5
    assert "cache" not in json.loads((tmp_path / "c" / "run.json").read_text())["metrics"]["before"]


def _flags_in_messages() -> set[str]:
    """Every --flag named in a string literal of prunekit's and the built-in plugins' code."""
    found = set()
    for path in [*(ROOT / "prunekit").rglob("*.py"), *(ROOT / "plugins").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value))
    return found


def test_no_message_names_a_flag_that_does_not_exist():
    sources = (ROOT / "prunekit" / "cli" / "commands.py").read_text() + (ROOT / "benchmarks" / "harness.py").read_text()
    defined = set(re.findall(r"add_argument\(\"(--[a-z0-9-]+)\"", sources)) | {"--help"}
    pip_flags = {"--no-deps"}  # in the install commands prunekit prints
    assert _flags_in_messages() - defined - pip_flags == set()


def test_eval_takes_a_device(tiny_model_dir, tmp_path, capsys):
    import torch

    cfg = tmp_path / "e.yaml"
    cfg.write_text("evaluation:\n  perplexity: [ptb]\n  ppl_window: 16\n  ppl_max_windows: 2\n  zero_shot: []\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--config", str(cfg),
                 "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["perplexity"]["ptb"]["n_windows"] == 2 and metrics["perplexity"]["ptb"]["ppl_stderr"] > 0
    if not torch.cuda.is_available():
        assert main(["eval", "--model", str(tiny_model_dir), "--device", "cuda", "--config", str(cfg)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
