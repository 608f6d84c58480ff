"""The GPU check and the scaling table, run end to end on CPU with the tiny shape (the same code path as on a GPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from prunekit.benchmarks.studies import gpu_check, scaling
from prunekit.benchmarks.studies.shapes import SHAPES, build, model_bytes

pytestmark = [pytest.mark.study]

STAGES = ["startup", "build", "groups", "calibrate", "score", "select", "prune", "perplexity"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])
def test_shapes_build_what_they_describe(name):
    """The analytic parameter count matches the built model (tied embeddings tied), weights drawn, norms at 1."""
    model = build(name, "cpu", torch.bfloat16, seed=1)
    spec = SHAPES[name]
    assert model.num_parameters() == spec.n_params()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model_bytes(model) == 2 * spec.n_params()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == spec.tie
    q = model.model.layers[0].self_attn.q_proj.weight.float()
    assert 0.015 < q.std().item() < 0.025 and torch.equal(model.model.norm.weight.float(), torch.ones(spec.hidden))
    assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == spec.kv_heads * spec.head_dim
    assert torch.equal(build(name, "cpu", torch.bfloat16, seed=1).model.embed_tokens.weight,
                       model.model.embed_tokens.weight)


def test_gpu_check_on_cpu_tiny(tmp_path):
    """One command, both methods: the JSON has every stage with time and memory, pruning shrank the model,
    scoring's dtype is recorded, and neither lm_eval nor datasets was imported (the GPU machine has neither)."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "prunekit.benchmarks.studies.gpu_check", "--device", "cpu", "--shapes", "tiny",
         "--methods", "taylor,moreau-gs", "--samples", "4", "--seq-len", "32", "--ppl-windows", "2",
         "--ppl-len", "64", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc == json.loads(out.read_text())
    assert doc["environment"]["versions"]["torch"] and doc["environment"]["versions"]["transformers"]
    assert doc["environment"]["device"] == "cpu"
    assert [(r["shape"], r["method"]) for r in doc["runs"]] == [("tiny", "taylor"), ("tiny", "moreau-gs")]
    for run in doc["runs"]:
        assert run["ok"] and "error" not in run
        assert list(run["stages"]) == STAGES
        for stage in run["stages"].values():
            assert stage["seconds"] >= 0 and stage["host_rss_peak_delta_bytes"] >= 0
        assert run["params_after"] < run["params_before"] and run["model_bytes_after"] < run["model_bytes_before"]
        assert run["model_bytes_before"] == 2 * SHAPES["tiny"].n_params()
        assert run["dtype_after_pruning"] == "bfloat16" and run["device_after_pruning"] == "cpu"
        assert run["heavy_modules_imported"] == []
        score = run["stages"]["score"]
        assert score["scores_finite"] and score["scoring"]["param_dtypes"]
        assert score["scoring"]["hidden_dtypes"]
        assert run["stages"]["calibrate"]["tokens"] == 4 * 32
        ppl = run["stages"]["perplexity"]
        assert ppl["tokens"] == 2 * 63 and math.isfinite(ppl["perplexity"]) and ppl["perplexity"] > 1
    taylor, moreau = doc["runs"]
    batches = 4 // 2
    assert taylor["stages"]["score"]["scoring"]["forwards"] == batches
    # moreau-gs's preset: its proximal steps, then the Fisher pass at the smoothed point (one forward per sequence)
    assert moreau["stages"]["score"]["scoring"]["forwards"] == moreau["stages"]["score"]["iterations"] * batches + 4
    assert [s["ok"] for s in doc["summary"]] == [True, True]


def test_gpu_check_failure_is_isolated(tmp_path):
    """A run that fails is recorded with its error and the stages it reached; the next run still goes."""
    base = {"device": "cpu", "dtype": "float32", "ratio": 0.25, "n_samples": 2, "seq_len": 16, "batch_size": 2,
            "ppl_windows": 1, "ppl_len": 32, "seed": 0, "threads": 1}
    specs = [{**base, "shape": "tiny", "method": "taylor", "device": "cuda:99"},  # no such device anywhere
             {**base, "shape": "tiny", "method": "magnitude"}]
    doc = gpu_check.check(specs, budget=500, run_timeout=240, out=str(tmp_path / "c.json"))
    failed, ok = doc["runs"]
    assert not failed["ok"] and failed["returncode"] == 1 and failed["traceback"]
    assert "build" not in failed["stages"] and failed["error"]
    assert ok["ok"] and ok["params_after"] < ok["params_before"]
    assert json.loads((tmp_path / "c.json").read_text())["summary"][0]["ok"] is False


def test_gpu_check_rejects_unknown_shape_and_method(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--shapes", "llama-70b"])
    assert exc.value.code == 2 and "llama-7b" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--shapes", "tiny", "--methods", "taylr"])
    assert exc.value.code == 2 and "taylor" in capsys.readouterr().err


def test_scaling_tiny(tmp_path, capsys):
    """The scaling script measures in a child process and writes JSON plus the markdown table it prints."""
    code = scaling.main(["--out", str(tmp_path), "--shapes", "tiny", "--dtypes", "bfloat16", "--methods", "moreau-gs",
                         "--samples", "tiny=2", "--seq-len", "16"])
    assert code == 0
    doc = json.loads((tmp_path / "scaling.json").read_text())
    (record,) = doc["records"]
    assert record["tokens"] == 32 and record["steps"] == 2 and record["scoring"]["forwards"] == 2
    assert record["peak_rss_delta_bytes"] > 0 and record["cpu_seconds"] > 0
    assert record["model_bytes"] == 2 * SHAPES["tiny"].n_params()
    assert record["peak_over_model"] == round(record["peak_rss_delta_bytes"] / record["model_bytes"], 3)
    assert doc["source"]["commit"]
    table = (tmp_path / "scaling.md").read_text()
    assert "| tiny |" in table and "moreau-gs" in table and table.strip() in capsys.readouterr().out
