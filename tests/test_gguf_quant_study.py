"""The quantization study (benchmarks/studies/quant_study.py): its llama.cpp perplexity equals PyTorch's on an F32
export, its rows resume, and its summary's ratios and quantization penalties are the ones it names."""

from __future__ import annotations

import json
import math
import os
from statistics import mean, stdev

import numpy as np
import pytest
import torch

from prunekit.benchmarks.studies import quant_study
from prunekit.io.gguf import export_gguf

if os.environ.get("CI"):
    import llama_cpp  # noqa: F401  (CI must run these tests: a missing runtime is a failure there)
else:
    pytest.importorskip("llama_cpp", reason="llama.cpp runtime: bash scripts/setup_llama_cpp.sh")

pytestmark = [pytest.mark.study, pytest.mark.usefixtures("one_thread")]


def test_llama_cpp_perplexity_equals_pytorch_on_an_f32_export(tmp_path):
    """Same windows, same shift (the logits at position i score token i+1), same mean over predicted tokens."""
    from test_gguf import byte_bpe, per_layer_model

    model = per_layer_model()
    path = export_gguf(model, byte_bpe(), tmp_path / "m.gguf", type="f32")
    g = torch.Generator().manual_seed(0)
    windows = {"ptb_test": torch.randint(0, 320, (3, 24), generator=g),
               "wikitext2_test": torch.randint(0, 320, (2, 24), generator=g)}
    measured = quant_study.llama_perplexity(path, windows, threads=1, kv_cache="f32")
    for key, w in windows.items():
        reference = quant_study.torch_perplexity(model, w)
        assert measured[key]["n_windows"] == len(w)
        assert np.allclose(measured[key]["window_nll_sums"], reference["window_nll_sums"], atol=2e-3)
        assert math.isclose(measured[key]["ppl"], reference["ppl"], rel_tol=1e-4)


def test_the_shuffled_control_computes_the_same_function():
    from conftest import make_tiny_llama

    model = make_tiny_llama().eval()
    shuffled = quant_study.shuffled_mlp(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, shuffled(ids).logits, atol=1e-5)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, shuffled.model.layers[0].mlp.down_proj.weight)


def row(method, seed, type_, ppl_ptb, allocator="measured", n_windows=40):
    torch_ppl = {"ppl": 10.0, "seconds": 0.0}
    return {"method": method, "allocator": None if method == "dense" else allocator, "seed": seed, "type": type_,
            "window": 128, "n_windows": n_windows, "loadavg": {"start": [1.0], "end": [2.0]},
            "llama_cpp": {"kv_cache": "f16"}, "ptb_test": {"llama": {"ppl": ppl_ptb}, "torch": torch_ppl}}


def test_summary_ratios_and_penalties():
    """Penalty = ppl(type)/ppl(f16) per seed, then mean ± s.d.; ratio to dense at the same type."""
    rows = [row("dense", None, "f16", 10.0), row("dense", None, "q4_0", 11.0),
            row("taylor", 0, "f16", 20.0), row("taylor", 0, "q4_0", 26.0),
            row("taylor", 1, "f16", 30.0), row("taylor", 1, "q4_0", 36.0),
            row("taylor", 0, "f16", 99.0, n_windows=4),  # another window count: not in this table
            row("taylor", 0, "f16", 50.0, allocator="uniform")]
    lines = quant_study.summary_tables(rows, window=128, n_windows=40)
    cells = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
             for line in lines if line.startswith("| ") and not line.startswith("| model")}
    assert cells[("dense", "q4_0")][6:] == ["1.000", "1.100", "1.000"]  # ratio to itself, penalty, relative
    taylor = cells[("taylor", "q4_0")]
    assert taylor[2] == "2" and taylor[3] == "31.00 ± 7.07"
    ratios, penalties = [26 / 11, 36 / 11], [26 / 20, 36 / 30]
    relative = [p / 1.1 for p in penalties]
    for cell, values in zip(taylor[6:], (ratios, penalties, relative)):
        assert cell == f"{mean(values):.3f} ± {stdev(values):.3f}"
    assert cells[("taylor (uniform)", "f16")][3] == "50.00"
    assert lines[0].startswith("7 rows, 40 evenly spaced windows of 128 tokens")


def test_rows_resume_and_a_torn_line_is_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    quant_study.append_row(path, row("dense", None, "f16", 10.0))
    with open(path, "a") as f:
        f.write('{"method": "taylor", "se')  # a write killed half way
    rows = quant_study.read_rows(path)
    assert [quant_study.row_key(r) for r in rows] == [("dense", None, None, "f16", 128, 40)]
    assert json.loads(path.read_text().splitlines()[0])["type"] == "f16"
