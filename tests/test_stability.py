"""``stability: K``: K calibration resamples, their agreement, and pruning with the consensus."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.cli import main
from prunekit.core.config import RunConfig
from prunekit.core.groups import CoupledSlice, PruningGroup
from prunekit.data.sampling import CalibrationSampler, derived_seed
from prunekit.pipeline.run import run
from prunekit.pipeline.stability import agreement, consensus

SMALL = {"selection": {"layers": [0, 4]}, "calibration": {"n_samples": 2, "seq_len": 16}, "ratio": 0.34,
         "evaluation": {"enabled": False}}


def group(name: str, layer: int, n: int = 4) -> PruningGroup:
    return PruningGroup(name, "mlp", layer, "channel", n, (CoupledSlice(name, 0, torch.arange(n).view(n, 1)),))


def test_consensus_is_the_mean_of_sum_normalised_scores():
    runs = [[torch.tensor([1.0, 3.0])], [torch.tensor([10.0, 10.0])]]
    torch.testing.assert_close(consensus(runs)[0], torch.tensor([0.375, 0.625]))


def test_agreement_counts_undecided_units_per_layer():
    groups = [group("a", 0), group("b", 1)]
    masks = [[torch.tensor([0, 1]), torch.tensor([0, 1])],  # removed: a{2,3}, b{2,3}
             [torch.tensor([0, 2]), torch.tensor([0, 1])]]  # removed: a{1,3}, b{2,3}
    report = agreement(groups, masks)
    assert report["undecided_units"] == 2 and report["undecided_per_layer"] == {"0": 2, "1": 0}
    assert report["removed_iou_per_layer"] == {"0": pytest.approx(1 / 3), "1": 1.0}
    assert report["removed_iou"] == pytest.approx(3 / 5)
    assert report["removed_per_resample"] == [4, 4]


def test_sampler_draw_zero_is_the_run_sample_and_children_continue_the_sequence():
    assert derived_seed(42, 0) == 42 and derived_seed(42, 1) != derived_seed(42, 2)
    sampler = CalibrationSampler(None, "ptb", 2, 16, 2, 42)
    assert sampler.child(3).seed == derived_seed(42, 3)


def pruned(tiny_model_dir, tmp_path, name: str, **extra) -> dict:
    config = RunConfig(**SMALL, method="taylor", model=str(tiny_model_dir), output=tmp_path / name, **extra)
    run(config, progress=False)
    return json.loads((tmp_path / name / "run.json").read_text())


def test_k1_is_a_plain_run(tiny_model_dir, tmp_path):
    plain = pruned(tiny_model_dir, tmp_path, "plain")
    one = pruned(tiny_model_dir, tmp_path, "one", stability=1)
    assert one["mask"] == plain["mask"]
    assert "stability" not in one["method"]["info"]


def test_stability_is_deterministic_and_reported(tiny_model_dir, tmp_path):
    first = pruned(tiny_model_dir, tmp_path, "k3a", stability=3)
    second = pruned(tiny_model_dir, tmp_path, "k3b", stability=3)
    assert first["mask"] == second["mask"]
    report = first["method"]["info"]["stability"]
    assert report == second["method"]["info"]["stability"]
    assert report["resamples"] == 3 and report["calibration_seeds"][0] == 42
    assert len(set(report["calibration_seeds"])) == 3
    assert set(report["removed_iou_per_layer"]) == {"0", "1", "2", "3"}
    assert 0 <= report["removed_iou"] <= 1 and report["undecided_units"] >= 0
    assert report["undecided_units"] == sum(report["undecided_per_layer"].values())
    assert len(report["consensus_removed_iou_vs_each"]) == 3
    assert first["config"]["stability"] == 3


def test_cli_flag_and_bad_values(tiny_model_dir, tmp_path, capsys):
    args = ["run", "--no-eval", "--method", "magnitude", "--model", str(tiny_model_dir), "--stability", "2",
            "--output", str(tmp_path / "m")]
    assert main(args) == 0
    capsys.readouterr()
    info = json.loads((tmp_path / "m" / "run.json").read_text())["method"]["info"]
    assert "no calibration" in info["stability"]["note"]  # data-free methods: nothing to resample
    assert main([*args[:-2], "--output", str(tmp_path / "bad"), "--stability", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stability" in err[0]
