"""The full-test-set driver (benchmarks/studies/full_eval.py) on a tiny model: spawned workers, shared scores, rows as
they finish, resume, time budget, summary/report, malformed input; and its composed stages equal
``prunekit.pipeline.prune.prune_with_config``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_llama, make_tiny_tokenizer

from prunekit.benchmarks.studies import full_eval, full_grid, full_report
from prunekit.pipeline.plan import plan

pytestmark = [pytest.mark.study]

CALIB = {"n_samples": 4, "seq_len": 32}
MLP = {"options": {"prune_attention": False}}
TINY_GRID = [
    {"id": "i13/taylor-10x64", "issue": "13", "label": "taylor", "tier": 0,
     "config": {"method": "taylor", "ratio": 0.25, "grouper": MLP, "calibration": CALIB}},
    {"id": "i13/moreau-gs-resample", "issue": "13", "label": "moreau-gs resample", "tier": 1,
     "config": {"method": "moreau-gs", "method_options": {"resample": True, "iterations": 2, "averaged": 1},
                "ratio": 0.25, "grouper": MLP, "calibration": CALIB}},
    {"id": "i14/taylor/uniform/0.2", "issue": "14", "allocator": "uniform", "budget": 0.2, "tier": 0,
     "config": {"method": "taylor", "calibration": CALIB, "allocation": {"name": "uniform", "params_removed": 0.2}}},
    {"id": "i14/taylor/measured/0.2", "issue": "14", "allocator": "measured", "budget": 0.2, "tier": 0,
     "config": {"method": "taylor", "calibration": CALIB,
                "allocation": {"name": "measured", "layers": "all", "params_removed": 0.2,
                               "options": {"probe_samples": 2, "probe_seq_len": 16}}}},
    {"id": "i14/taylor/global/0.2", "issue": "14", "allocator": "global", "budget": 0.2, "tier": 1,
     "config": {"method": "taylor", "calibration": CALIB, "allocation": {"name": "global", "params_removed": 0.2}}},
]
BLOCKED = ("lm_eval", "datasets")  # absent on the GPU machine: nothing the driver runs may import them


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("full-eval") / "tiny-model"
    make_tiny_llama(9, 3, layers=4).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def grid_file(tiny_dir) -> Path:
    path = tiny_dir.parent / "grid.yaml"
    path.write_text(yaml.safe_dump(TINY_GRID))
    return path


@pytest.fixture(scope="module")
def blocker(tiny_dir) -> Path:
    """A folder whose lm_eval and datasets packages fail to import (put first on PYTHONPATH)."""
    root = tiny_dir.parent / "blocked"
    for name in BLOCKED:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    return root


def _driver(args: list[str], blocker: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "prunekit.benchmarks.studies.full_eval", *args], env=env, text=True,
                          capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def finished(tiny_dir, grid_file, blocker) -> tuple[Path, subprocess.CompletedProcess]:
    """One driver run: 5 cells x 2 seeds, 2 windows per set, one spawned worker, lm_eval/datasets blocked."""
    out = tiny_dir.parent / "results"
    proc = _driver(["--model", str(tiny_dir), "--grid-file", str(grid_file), "--seeds", "0,1", "--windows", "2",
                    "--workers", "1", "--threads", "1", "--out", str(out)], blocker)
    return out, proc


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def test_driver_runs_the_grid_without_lm_eval_or_datasets(finished):
    out, proc = finished
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["kind"] for r in rows].count("dense") == 1 and not [r for r in rows if r["kind"] == "error"]
    cells = {(r["cell"], r["seed"]): r for r in rows if r["kind"] == "cell"}
    assert set(cells) == {(c["id"], s) for c in TINY_GRID for s in (0, 1)}
    for r in cells.values():
        assert {k: v["n_windows"] for k, v in r["eval"].items()} == {s: 2 for s, *_ in full_eval.SETS}
        assert all(v["ppl"] > 1 and v["ppl"] == pytest.approx(torch.tensor(v["nll"]).exp().item())
                   for v in r["eval"].values())
    for seed in (0, 1):  # a budget is met from below; the measured allocator touches every layer
        for cid in ("i14/taylor/uniform/0.2", "i14/taylor/measured/0.2", "i14/taylor/global/0.2"):
            assert 0 < cells[(cid, seed)]["params_removed_fraction"] <= 0.2
        # global (tier 1) shares uniform's scores (tier 0, same groups and calibration): read from DIR/scores
        assert cells[("i14/taylor/global/0.2", seed)]["timings"]["scores_cached"] is True
        assert cells[("i14/taylor/uniform/0.2", seed)]["timings"]["scores_cached"] is False
        draws = cells[("i13/moreau-gs-resample", seed)]["score_info"].get("calibration_draws")
        assert [d["draw"] for d in draws] == [1]  # step 2 of 2 drew a fresh sample through the sampler
    assert "done:" in proc.stdout and "dense:" in proc.stdout
    masks = full_report.read_masks(out)
    assert set(masks) == set(cells)
    assert ({f"layers.{i}.{k}" for i in range(4) for k in ("attention", "mlp")}
            == set(masks[("i14/taylor/measured/0.2", 0)]))
    # few flat files: a results folder travels whole (the device machine returns at most 8)
    assert sorted(p.name for p in out.iterdir()) == sorted([full_eval.RUN, full_eval.ROWS, full_eval.MASKS,
                                                            full_eval.SUMMARY_JSON, full_eval.SUMMARY_MD])


def test_summary_tables_choices_and_report(finished):
    out, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] == summary["expected"] == len(TINY_GRID) * 2 and not summary["errors"]
    by_id = {c["id"]: c for c in summary["cells"]}
    taylor = by_id["i13/taylor-10x64"]
    assert taylor["ratio_to_reference"] == {s: pytest.approx(1.0) for s in full_report.SETS}
    assert taylor["cost_taylor_passes"] == pytest.approx(0.4) and taylor["time_over_taylor"] == pytest.approx(1.0)
    rows = [r for r in _rows(out) if r.get("cell") == "i13/taylor-10x64"]
    assert taylor["ppl"]["ptb_test"]["mean"] == pytest.approx(sum(r["eval"]["ptb_test"]["ppl"] for r in rows) / 2)
    assert 0.0 <= taylor["removed_iou"] <= 1.0
    uniform = by_id["i14/taylor/uniform/0.2"]
    assert uniform["ratio_to_reference"]["ptb_test"] == pytest.approx(1.0)
    measured = by_id["i14/taylor/measured/0.2"]
    assert measured["ratio_to_reference"]["wikitext2_test"] == pytest.approx(
        measured["ppl"]["wikitext2_test"]["mean"] / uniform["ppl"]["wikitext2_test"]["mean"])
    # choices look at PTB validation only
    best = min((c for c in summary["cells"] if c["issue"] == "14"), key=lambda c: c["ppl"]["ptb_validation"]["mean"])
    assert summary["choices"]["issue14"] == {"taylor@0.2": best["id"]}
    assert set(summary["choices"]["issue13"]) == {"taylor", "moreau-gs"}
    assert any(v.startswith("issue 13: moreau-gs") for v in summary["verdicts"])
    for p in out.glob("full_eval_*.png"):
        p.unlink()
    assert full_eval.main(["--report", str(out)]) == 0
    assert {"full_eval_alloc_taylor.png", "full_eval_ppl_vs_cost.png"} <= {p.name for p in out.iterdir()}
    md = (out / "summary.md").read_text()
    assert ("### Issue 13" in md and "### Issue 14" in md
            and "![full_eval_alloc_taylor](full_eval_alloc_taylor.png)" in md)


def test_a_second_run_resumes_and_a_spent_budget_still_writes_a_summary(finished, tiny_dir, grid_file, blocker):
    out, _ = finished
    before = (out / "rows.jsonl").read_text()
    again = _driver(["--model", str(tiny_dir), "--grid-file", str(grid_file), "--seeds", "0,1", "--windows", "2",
                     "--out", str(out)], blocker)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (out / "rows.jsonl").read_text() == before
    spent = tiny_dir.parent / "spent"
    proc = _driver(["--model", str(tiny_dir), "--grid-file", str(grid_file), "--seeds", "0", "--windows", "2",
                    "--time-budget-s", "0.001", "--grace-s", "600", "--out", str(spent)], blocker)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((spent / "summary.json").read_text())
    assert summary["complete"] == 0 and summary["expected"] == len(TINY_GRID) and "not started" in proc.stdout


def test_composed_stages_equal_prune_with_config(tiny_dir, tmp_path, one_thread):
    """The driver's score-once path (groups, calibrate, stability.score, allocate_select, apply) prunes exactly
    what ``api.prune_with_config`` prunes for the same config."""
    from prunekit import api

    emitted: list[tuple[str, dict]] = []
    worker = full_eval.Worker({"device": "cpu", "model": str(tiny_dir), "windows": 1, "eval_batch": 2,
                               "scores_dir": str(tmp_path)}, lambda kind, payload: emitted.append((kind, payload)))
    cells = [c for c in TINY_GRID if c["id"] in ("i14/taylor/uniform/0.2", "i14/taylor/global/0.2")]
    worker.task(cells, 3, None)
    worker.task([c for c in TINY_GRID if c["id"] == "i14/taylor/measured/0.2"], 3, None)
    worker.task([c for c in TINY_GRID if c["id"] == "i13/moreau-gs-resample"], 3, None)
    rows = [p for k, p in emitted if k == "row"]
    masks = {p["cell"]: p["removed"] for k, p in emitted if k == "mask"}
    assert [r["cell"] for r in rows] == ["i14/taylor/uniform/0.2", "i14/taylor/global/0.2",
                                         "i14/taylor/measured/0.2", "i13/moreau-gs-resample"]
    for row in rows:
        cell = next(c for c in TINY_GRID if c["id"] == row["cell"])
        model, tokenizer, _ = api.load_model(str(tiny_dir))
        result = api.prune_with_config(model, tokenizer, full_grid.run_config(cell, 3, "cpu"))
        expected = {name: sorted(set(range(m["n_units"])) - set(m["kept"])) for name, m in result.mask.items()}
        assert masks[row["cell"]] == expected
        assert row["params"] == model.num_parameters()


def test_grid_cells_are_valid_run_configs():
    from prunekit.plugin.registry import get_registry

    cells = full_grid.cells(["issue13", "issue14"])
    # 9 sweep points; 5 allocators x 2 methods x 2 budgets
    assert len(cells) == 9 + 5 * 2 * 2 and len({c["id"] for c in cells}) == len(cells)
    for cell in cells:
        plan(full_grid.run_config(cell, 0, "cpu"), get_registry())
    tasks = full_eval.plan_tasks(cells, [0, 1, 2], set(), False, "cpu")
    assert tasks[0]["kind"] == "dense"
    first_tier1 = next(i for i, t in enumerate(tasks) if t["kind"] == "cells" and t["cells"][0]["tier"] == 1)
    assert all(t["cells"][0]["tier"] == 0 for t in tasks[1:first_tier1])
    # issue 14: both budgets of one allocator share one scoring task per (method, seed)
    uniform = [t for t in tasks if t["kind"] == "cells" and t["cells"][0]["id"].startswith("i14/taylor/uniform/")]
    assert len(uniform) == 3 and all({"i14/taylor/uniform/0.158", "i14/taylor/uniform/0.25"}
                                     <= {c["id"] for c in t["cells"]} for t in uniform)


BAD = [
    (["--grid", "issue99"], "--grid: unknown"),
    (["--cells", "no-such-*"], "--cells"),
    (["--grid-file", "{tmp}/missing.yaml"], "--grid-file: cannot read"),
    (["--grid-file", "{tmp}/notcells.yaml"], "expected a list of cells"),
    (["--grid-file", "{tmp}/badmethod.yaml"], "cell x: method"),
    (["--grid-file", "{tmp}/badoption.yaml"], "cell x: method_options"),
    (["--grid-file", "{tmp}/dup.yaml"], "duplicate cell ids"),
    (["--grid-file", "{tmp}/badalloc.yaml"], "cell x: allocation"),
]
FILES = {
    "notcells.yaml": "a: 1\n",
    "badmethod.yaml": yaml.safe_dump([{"id": "x", "config": {"method": "nope"}}]),
    "badoption.yaml": yaml.safe_dump([{"id": "x", "config": {"method": "taylor", "method_options": {"bogus": 1}}}]),
    "dup.yaml": yaml.safe_dump([{"id": "x", "config": {"method": "taylor"}}] * 2),
    "badalloc.yaml": yaml.safe_dump([{"id": "x", "config": {"method": "taylor",
                                                            "allocation": {"params_removed": 1.5}}}]),
}


@pytest.mark.parametrize("argv,expect", BAD, ids=[e for _, e in BAD])
def test_malformed_driver_input_is_one_line_and_writes_nothing(argv, expect, tmp_path, capsys):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    code = full_eval.main([a.format(tmp=tmp_path) for a in argv] + ["--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--windows", "0"], ["--windows", "some"], ["--workers", "0"], ["--seeds", "a,b"],
                                  ["--time-budget-s", "-1"], ["--device", "tpu"]])
def test_malformed_driver_flags_exit_2(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        full_eval.parse_args([*argv, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and not (tmp_path / "o").exists()
