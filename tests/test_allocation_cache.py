"""A second identical run reuses the measured allocation from disk instead of probing again; anything the counts
depend on (seed, budget, allocator options) is a different entry, and the switch turns the cache off."""

from __future__ import annotations

import json

import pytest

from prunekit.allocation.probe import LossProbe
from prunekit.cli import main

PROBE = {"options": {"probe_samples": 2, "probe_seq_len": 12, "search_steps": 4}}


@pytest.fixture
def probes(monkeypatch, tmp_path):
    """Count calibration-loss probes; prunekit's cache in a temporary folder."""
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    calls = []
    original = LossProbe.loss

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LossProbe, "loss", counted)
    return calls


def _run(tiny_model_dir, out, *extra, allocation=PROBE) -> dict:
    config = out.parent / f"{out.name}.yaml"  # JSON is YAML
    config.write_text(json.dumps({"allocation": allocation}))
    assert main(["run", "--no-eval", "--method", "magnitude", "--model", str(tiny_model_dir), "--output", str(out),
                 "--config", str(config), *extra]) == 0
    return json.loads((out / "run.json").read_text())


def test_a_second_identical_run_reads_the_allocation_and_does_not_probe(tiny_model_dir, tmp_path, probes, one_thread):
    first = _run(tiny_model_dir, tmp_path / "a")
    probed = len(probes)
    second = _run(tiny_model_dir, tmp_path / "b")
    assert probed > 0 and len(probes) == probed  # no probe the second time
    assert first["allocation"]["cache"]["hit"] is False and second["allocation"]["cache"]["hit"] is True
    assert second["allocation"]["counts"] == first["allocation"]["counts"] and second["mask"] == first["mask"]
    assert second["allocation"]["measured"] == first["allocation"]["measured"]  # the record travels with it


@pytest.mark.parametrize("extra", [["--seed", "7"], ["--ratio", "0.4"], ["--params-removed", "0.05"]])
def test_what_the_counts_depend_on_is_another_entry(tiny_model_dir, tmp_path, probes, one_thread, extra):
    _run(tiny_model_dir, tmp_path / "a")
    again = _run(tiny_model_dir, tmp_path / "b", *extra)
    assert again["allocation"]["cache"]["hit"] is False


def test_the_switch_turns_the_cache_off(tiny_model_dir, tmp_path, probes, one_thread):
    _run(tiny_model_dir, tmp_path / "a")
    probed = len(probes)
    again = _run(tiny_model_dir, tmp_path / "b", "--no-allocation-cache")
    assert len(probes) > probed and "cache" not in again["allocation"]
    assert again["config"]["allocation"]["cache"] is False


def test_cheap_allocators_are_not_cached(tiny_model_dir, tmp_path, probes, one_thread):
    run = _run(tiny_model_dir, tmp_path / "a", allocation={"name": "uniform"})
    assert "cache" not in run["allocation"] and not (tmp_path / "cache" / "allocations").exists()
