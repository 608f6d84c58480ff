"""The benchmark harness on a tiny saved model: JSON, markdown and plots come out; the mask metrics are right."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

from prunekit.benchmarks import harness
from prunekit.benchmarks.metrics import compare_masks, iou, summary
from prunekit.benchmarks.perturb import PERTURBATIONS, noisy, rounded
from prunekit.core.groups import CoupledSlice, PruningGroup


def _group(name: str, kind: str, layer: int, n: int) -> PruningGroup:
    return PruningGroup(name, kind, layer, "channel", n, (CoupledSlice("m", 0, torch.arange(n).unsqueeze(1)),))


def test_iou_of_sets():
    assert iou({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 4)
    assert iou(set(), set()) == 1.0
    assert iou({1}, {2}) == 0.0


def test_compare_masks_counts_flips_per_kind_and_layer():
    groups = [_group("l0.attn", "attention", 0, 4), _group("l0.mlp", "mlp", 0, 6), _group("l1.mlp", "mlp", 1, 6)]
    base = [torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])]
    other = [torch.tensor([0, 1, 3]), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 4, 5])]
    out = compare_masks(groups, base, other)
    assert out["flipped_attention"] == 2 and out["flipped_mlp"] == 4 and out["flipped"] == 6
    assert out["iou_attention"] == pytest.approx(2 / 4)
    assert out["iou_mlp"] == pytest.approx(6 / 10)
    assert out["iou"] == pytest.approx(8 / 14)
    assert out["iou_per_layer"] == {"0": pytest.approx(6 / 8), "1": pytest.approx(2 / 6)}
    assert compare_masks(groups, base, base)["iou"] == 1.0


def test_summary_spread():
    assert summary([1.0, 3.0, None]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "spread": 2.0, "n": 2}
    assert summary([None]) is None


def test_rounding_and_noise_report_changed_weights():
    model = make_tiny_llama(4, 2, layers=1)
    total = sum(p.numel() for p in model.parameters())
    bf16, changed, counted = rounded(model, torch.bfloat16)
    assert counted == total and changed > total // 2  # random float32 weights need more than bf16's 8 bits
    assert rounded(bf16, torch.bfloat16)[1] == 0  # already bf16-exact: rounding again changes nothing
    clone, changed_noise, _ = noisy(model, 0.01, seed=0)
    assert changed_noise > 0
    rel = max(((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()
              for a, b in zip(clone.parameters(), model.parameters()))
    assert rel < 0.1


def test_harness_quick_profile_writes_json_markdown_and_plots(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    code = harness.main(["--model", str(tiny_model_dir), "--suite", "all", "--methods", "magnitude,taylor,no-such",
                         "--seeds", "0,1", "--profile", "quick", "--no-isolate", "--threads", "1", "--ppl-windows", "4",
                         "--perturbations", ",".join(PERTURBATIONS), "--quiet", "--out", str(out)])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    for suite in ("robustness", "cost", "quality"):
        assert {f"{suite}-magnitude.json", f"{suite}-taylor.json", f"{suite}-no-such.json"} <= names
    assert {"peer.json", "report.md", "robustness_iou_vs_noise.png", "quality_ppl_vs_ratio.png", "cost.png"} <= names
    rob = json.loads((out / "robustness-taylor.json").read_text())
    by = rob["aggregate"]["by_perturbation"]
    assert {"unperturbed", "bfloat16-weights", "float16-weights", "bfloat16-estimation", "noise-0.1%", "noise-0.4%",
            "noise-1.0%", "calibration-resample"} == set(by)
    assert by["unperturbed"]["iou"]["mean"] == 1.0
    assert all(0.0 <= row["iou"]["min"] <= 1.0 for row in by.values())
    assert len(rob["per_seed"]) == 2
    mag = json.loads((out / "robustness-magnitude.json").read_text())["aggregate"]["by_perturbation"]
    assert mag["calibration-resample"]["iou"]["mean"] == 1.0  # data-free: the calibration sample cannot matter
    cost = json.loads((out / "cost-taylor.json").read_text())
    assert cost["params_pruned"] < cost["params_dense"] and cost["estimation_seconds"] > 0
    assert "skipped" in json.loads((out / "cost-no-such.json").read_text())
    report = (out / "report.md").read_text()
    for heading in ("## Robustness", "## Cost", "## Quality", "## Peer"):
        assert heading in report
    assert "no-such" in report
    assert harness.main(["--suite", "report", "--out", str(out), "--quiet"]) == 0


def test_harness_unknown_model_is_a_user_error(tmp_path, capsys):
    assert harness.main(["--model", str(tmp_path / "missing"), "--suite", "cost", "--quiet",
                         "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


def test_sweep_suite_writes_points_choice_and_pareto_plots(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep"
    code = harness.main(["--model", str(tiny_model_dir), "--suite", "sweep", "--methods", "taylor", "--seeds", "0,1",
                         "--threads", "1", "--sweep-val-windows", "2", "--sweep-test-windows", "2", "--quiet",
                         "--out", str(out)])
    assert code == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == ["taylor 10x64 (default)", "taylor 100x64"]
    assert record["points"][0]["cost_taylor_passes"] == 1.0
    for p in record["points"]:
        assert 0.0 <= p["removed_iou"] <= 1.0 and p["ppl_ptb_validation"]["n"] == 2
        assert p["ppl_ptb_test"]["mean"] > 1 and p["ppl_wikitext2_test"]["mean"] > 1
    assert record["chosen"]["taylor"] in {"taylor 10x64 (default)", "taylor 100x64"}
    assert {"sweep_ppl_vs_cost.png", "sweep_iou_vs_cost.png"} <= {p.name for p in out.iterdir()}
    assert "## Sweep" in (out / "report.md").read_text()


def test_sweep_choice_uses_validation_within_the_cost_cap(tiny_model_dir, tmp_path):
    from prunekit.benchmarks import sweep
    from prunekit.benchmarks.profiles import PROFILES
    from prunekit.benchmarks.workbench import Workbench

    grid = (sweep.GRID[0], sweep.Point("fisher", {}, 4, "fisher 4x64"),
            sweep.Point("moreau-gs", {"resample": True, "iterations": 3, "averaged": 2, **sweep.RELATIVE}, 4, "mgs"))
    wb = Workbench.open(str(tiny_model_dir), PROFILES["quick"])
    record = sweep.run(wb, ["taylor", "fisher", "moreau-gs"], [0, 1], val_windows=2, test_windows=2, grid=grid)
    mgs = record["points"][2]
    assert [d["draw"] for d in mgs["rows"][0]["info"]["calibration_draws"]] == [1, 2]
    assert record["chosen"] == {"taylor": grid[0].name(), "fisher": "fisher 4x64", "moreau-gs": "mgs"}
    # a point over the cap is never chosen, whatever its perplexity
    # 10, 4 and (3 steps + the preset's Fisher pass) x 4 sequences
    assert [p["cost_taylor_passes"] for p in record["points"]] == [1.0, 0.4, 1.6]
    assert mgs["rows"][0]["info"]["moreau"]["salience"] == "fisher"
    big = dict(record["points"][1], name="fisher 200x64", point={"method": "fisher", "options": {}, "samples": 200},
               ppl_ptb_validation={"mean": 0.5})
    assert sweep.choose([*record["points"], big], 10.0)["fisher"] == "fisher 4x64"  # 20 passes: over the cap
    assert sweep.choose([*record["points"], big], 20.0)["fisher"] == "fisher 200x64"


# ---- issue 13 leftovers: the workbench scores with a calibration sampler; fisher is in the suites


def test_workbench_score_gives_methods_a_calibration_sampler(tiny_model_dir, one_thread):
    """Presets that draw a fresh sample per step (moreau ``resample``) need the sampler a run gives them; the
    robustness suite's other-calibration perturbation draws from its own seed."""
    from prunekit import api
    from prunekit.benchmarks.profiles import PROFILES
    from prunekit.benchmarks.workbench import Workbench
    from prunekit.data.sampling import derived_seed
    from prunekit.errors import UserError

    wb = Workbench.open(str(tiny_model_dir), PROFILES["quick"])
    groups = wb.groups(wb.model)
    options = {"resample": True, "iterations": 2, "averaged": 1}
    batches, _ = wb.calibration(0)
    with pytest.raises(UserError, match="method_options.resample.*no sampler"):  # no sampler, no resampling
        api.score(wb.model, groups, "moreau-gs", batches, options=options, seed=0, registry=wb.registry)
    scores, info, _ = wb.score(wb.model, groups, "moreau-gs", batches, 0, options=options)
    assert [(d["draw"], d["seed"]) for d in info["calibration_draws"]] == [(1, derived_seed(0, 1))]
    assert len(scores) == len(groups)
    other, _ = wb.calibration(1000)
    _, info, _ = wb.score(wb.model, groups, "moreau-gs", other, 0, options=options, calib_seed=1000)
    assert info["calibration_draws"][0]["seed"] == derived_seed(1000, 1)
    # draw 0 of the sampler is the batches the suites pass: a resampling run equals api.score given that sampler
    again, _ = api.score(wb.model, groups, "moreau-gs", batches, options=options, seed=0, registry=wb.registry,
                         sampler=wb.sampler(0))
    assert all(torch.equal(a, b) for a, b in zip(scores, again))


def test_fisher_runs_in_the_quality_and_robustness_suites(tiny_model_dir, tmp_path):
    assert "fisher" in harness.DEFAULT_METHODS
    out = tmp_path / "bench"
    for suite in ("quality", "robustness"):
        assert harness.main(["--model", str(tiny_model_dir), "--suite", suite, "--methods", "fisher", "--seeds", "0",
                             "--threads", "1", "--ppl-windows", "2", "--ratios", "0.25", "--perturbations",
                             "calibration-resample", "--quiet", "--out", str(out)]) == 0
    quality = json.loads((out / "quality-fisher.json").read_text())
    assert "error" not in quality and quality["rows"]
    assert all(p > 1 for r in quality["rows"] for p in r["ppl"].values())
    rob = json.loads((out / "robustness-fisher.json").read_text())
    by = rob["aggregate"]["by_perturbation"]
    assert "error" not in rob and by["unperturbed"]["iou"]["mean"] == 1.0
    assert not by["calibration-resample"]["errors"] and 0.0 <= by["calibration-resample"]["iou"]["mean"] <= 1.0
