"""benchmarks/studies/recovery_table.py: variant grammar, budgets, the summary's ratios and the plot."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.study


def test_variants_and_budgets_parse():
    from prunekit.benchmarks.studies.recovery_table import budget_kwargs, cache_name, parse_variant

    assert parse_variant("none") == ("none", "none", 0)
    assert parse_variant("refit") == ("refit", "none", 0)
    assert parse_variant("bias") == ("bias", "none", 0)
    assert parse_variant("refit+distill@16384") == ("refit", "distill", 16384)
    assert parse_variant("bias+lora@10") == ("bias", "lora", 10)
    assert parse_variant("lora@32768") == ("none", "lora", 32768)
    for bad in ("lsq+lora@10", "refit+bias", "refit+tune@10"):
        with pytest.raises(SystemExit):
            parse_variant(bad)
    ptb = {"calibration": {"source": "ptb"}}  # the rows without @ were pruned on PTB, whatever prunekit's default
    assert budget_kwargs("ratio:0.25") == {"ratio": 0.25, **ptb}
    assert budget_kwargs("params:0.25") == {"allocation": {"name": "measured", "params_removed": 0.25}, **ptb}
    assert budget_kwargs("ratio:0.25@pd-books+ptb") == {"ratio": 0.25, "calibration": {"source": "pd-books+ptb"}}
    assert cache_name("params:0.25@0.5*pd-books+0.5*ptb", 1) == "params-0.25@0.5xpd-books+0.5xptb-seed1"
    assert cache_name("ratio:0.25", 0) == "ratio-0.25-seed0"  # the folders cached before calibration was a choice


def test_summary_gives_means_ratios_to_dense_and_seed_ranges(tmp_path):
    from prunekit.benchmarks.studies.recovery_table import plot, summarize

    dense = {"budget": "dense", "seed": -1, "variant": "dense", "ptb_test": 100.0, "wikitext2_test": 50.0,
             "ptb_validation": 100.0, "pdbooks_validation": 40.0}
    rows = [dense] + [{"budget": "ratio:0.25", "seed": s, "variant": v, "ptb_test": p, "wikitext2_test": w,
                       "ptb_validation": p, "pdbooks_validation": 60.0, "repair_s": 1.0, "recover_s": r,
                       "trained_tokens": t}
                      for s, v, p, w, r, t in [(0, "none", 140.0, 80.0, 0.0, None), (1, "none", 150.0, 90.0, 0.0, None),
                                               (0, "distill@100", 120.0, 60.0, 5.0, 98),
                                               (1, "distill@100", 130.0, 70.0, 7.0, 101)]]
    lines = summarize(rows)
    none = next(line for line in lines if "| none |" in line)
    assert "145.00 (1.45×) [140.0–150.0]" in none and "85.00 (1.70×) [80.0–90.0]" in none
    distill = next(line for line in lines if "distill@100" in line)
    assert "65.00 (1.30×)" in distill and distill.endswith("| 1 | 6 |")
    assert plot(rows, tmp_path / "p.png").stat().st_size > 0


def test_learning_curve_points_and_learning_rates_are_their_own_rows():
    from prunekit.benchmarks.studies.recovery_table import key, parse_variant, summarize

    assert parse_variant("refit+lora@524288:131072") == ("refit", "lora", 131072)
    # older rows: lr 1e-4 and text pd-books; what "none" means depends on neither
    assert key({"budget": "b", "seed": 0, "variant": "lora@10"}) == ("b", 0, "lora@10", 1e-4, "pd-books")
    assert key({"budget": "b", "seed": 0, "variant": "refit", "lr": 3e-4}) == ("b", 0, "refit", None, "pd-books")
    assert key({"budget": "b", "seed": 0, "variant": "lora@10", "text": "ptb"}) == ("b", 0, "lora@10", 1e-4, "ptb")
    assert key({"budget": "b", "seed": 0, "variant": "none", "text": "ptb"}) == ("b", 0, "none", None, None)
    row = {"budget": "b", "seed": 0, "ptb_test": 1.0, "wikitext2_test": 1.0, "ptb_validation": 1.0,
           "pdbooks_validation": 1.0, "repair_s": 0.0, "recover_s": 1.0}
    lines = summarize([{**row, "variant": "lora@10", "lr": 1e-4}, {**row, "variant": "lora@10", "lr": 1e-3},
                       {**row, "variant": "lora@10:5", "lr": 1e-3}, {**row, "variant": "lora@10", "text": "ptb"}])
    assert [line.split(" | ")[1] for line in lines[2:]] == ["lora@10 lr 0.0001", "lora@10 lr 0.001",
                                                            "lora@10:5 lr 0.001", "lora@10 lr 0.0001 on ptb"]


def test_milestones_fire_once_each_at_their_share_of_the_steps():
    from types import SimpleNamespace

    from prunekit.benchmarks.studies.recovery_table import milestone_callback

    seen = []
    callback = milestone_callback([100, 250, 1000], total=1000, on_milestone=lambda *point: seen.append(point))
    for step in range(1, 11):
        callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=10), None, model="m")
    # 250 is reached after step 3 of 10 (300 tokens); the run's end is the row itself
    assert seen == [("m", 100, 100), ("m", 250, 300)]
