"""Budgets and allocators: every allocator meets the budget from below, yields valid GQA shapes, is
deterministic and prunes exactly (pruned model == original with the removed units zeroed)."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from conftest import LAYOUTS, make_tiny_llama, make_tiny_tokenizer
from test_pruning import IDS, zero_removed

from prunekit.adapters.grouping import GrouperOptions, apply_plan, build_groups
from prunekit.adapters.llama import LlamaAdapter
from prunekit.allocation.base import AllocationContext, allocate
from prunekit.allocation.probe import LossProbe
from prunekit.cli import main
from prunekit.core.budget import feasible_counts, make_budget, ratio_counts, unit_cost
from prunekit.core.select import keep_from_counts, select
from prunekit.errors import UserError
from prunekit.importance.base import ScoringContext
from prunekit.plugin.registry import get_registry

ALLOCATORS = [("uniform", {}), ("uniform", {"kinds": ["mlp"]}), ("global", {}), ("global", {"standardize": True}),
              ("measured", {"probe_samples": 2, "probe_seq_len": 12}),
              ("measured", {"probe_samples": 2, "probe_seq_len": 12, "kinds": "mlp", "fractions": [0.2, 0.6],
                            "max_excess": None}),
              ("measured", {"probe_samples": 2, "probe_seq_len": 12, "max_excess": 0.1}),
              ("measured", {"probe_samples": 2, "probe_seq_len": 12, "search_steps": 6}),
              ("measured", {"probe_samples": 2, "probe_seq_len": 12, "search_steps": 6, "kinds": "mlp",
                            "max_excess": None, "search_samples": 3, "search_step": 0.25})]
FRACTION = {"mha4": 0.1, "gqa8x2": 0.3, "gqa4x2": 0.2, "gqa9x3": 0.25}  # one budget per layout keeps it quick


def setup(layout: str, layers=None, seed: int = 0):
    model = make_tiny_llama(*LAYOUTS[layout], seed=seed)
    adapter = LlamaAdapter(model)
    groups = build_groups(model, adapter, layers or range(adapter.num_layers), GrouperOptions())
    entry = get_registry().method("taylor")
    scores = entry.cls(entry.options()).scores(ScoringContext(model=model, groups=groups, batches=[IDS], seed=1))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, adapter, groups, [s.detach() for s in scores]


def context(model, adapter, groups, scores, fraction=None, ratio=0.25, round_to=1):
    costs = [unit_cost(model, g) for g in groups]
    budget = make_budget(groups, costs, model.num_parameters(), ratio, fraction, round_to)
    g = torch.Generator().manual_seed(5)

    def sample(n, seq_len):
        return [torch.randint(0, 96, (n, seq_len), generator=g)]

    return AllocationContext(model=model, groups=groups, scores=scores, costs=costs, budget=budget,
                             round_to=round_to, layers=adapter.layers(), sample=sample)


def run_allocator(ctx, name, options):
    entry = get_registry().named("allocators", name)
    return allocate(ctx, name, entry.impl(entry.impl.Options(**options)))


@pytest.mark.parametrize("name,options", ALLOCATORS, ids=[f"{n}-{o}" for n, o in ALLOCATORS])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_allocator_meets_budget_from_below_and_prunes_exactly(name, options, layout):
    fraction = FRACTION[layout]
    model, adapter, groups, scores = setup(layout)
    ctx = context(model, adapter, groups, scores, fraction)
    counts, info = run_allocator(ctx, name, options)
    assert info["params_removed"] <= ctx.budget.params and info["gap_params"] >= 0
    assert info["params_removed"] > 0
    kinds = options.get("kinds", ["attention", "mlp"])
    kinds = {kinds} if isinstance(kinds, str) else set(kinds)
    assert all(c == 0 for g, c in zip(groups, counts) if g.kind not in kinds)
    kept = keep_from_counts(groups, scores, counts)
    reference = zero_removed(make_tiny_llama(*LAYOUTS[layout]), groups, kept)
    before = model.num_parameters()
    apply_plan(model, adapter, groups, kept)
    shapes = adapter.sync_config()
    assert before - model.num_parameters() == info["params_removed"]  # the cost accounting is exact
    for shape, layer in zip(shapes, model.model.layers):  # a valid GQA model
        assert shape.num_attention_heads % shape.num_key_value_heads == 0 and shape.num_key_value_heads >= 1
        assert layer.self_attn.num_key_value_groups == shape.num_attention_heads // shape.num_key_value_heads
    with torch.no_grad():
        assert (model(IDS).logits - reference(IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,options", ALLOCATORS[::2], ids=[n for n, _ in ALLOCATORS[::2]])
def test_allocator_is_deterministic(name, options):
    runs = [run_allocator(context(*setup("gqa9x3"), 0.25), name, options)[0] for _ in range(2)]
    assert runs[0] == runs[1]


def test_feasible_counts_honour_gqa_and_round_to():
    _, _, groups, _ = setup("gqa9x3", layers=range(1))
    attention, mlp = groups
    assert feasible_counts(attention) == [0, 3, 6]
    assert feasible_counts(mlp, round_to=8) == list(range(0, 41, 8))
    assert feasible_counts(mlp)[-1] == mlp.n_units - 1


def test_ratio_budget_with_uniform_is_todays_local_selection():
    model, adapter, groups, scores = setup("gqa8x2")
    ctx = context(model, adapter, groups, scores, None, ratio=0.4)
    counts, info = run_allocator(ctx, "uniform", {})
    assert [k.tolist() for k in keep_from_counts(groups, scores, counts)] == \
        [k.tolist() for k in select(groups, scores, 0.4)]
    assert info["gap_params"] == 0 and info["budget"]["ratio"] == 0.4
    # other allocators get the same number of parameters as the budget
    assert ctx.budget.params == sum(c * k for c, k in zip(ratio_counts(groups, 0.4), ctx.costs))


def test_loss_probe_replays_layers_exactly():
    model, adapter, groups, scores = setup("gqa9x3")
    batches = [torch.arange(24).view(2, 12) % 96]
    probe = LossProbe(model, adapter.layers(), batches)
    with torch.no_grad():
        dense = model(input_ids=batches[0], labels=batches[0]).loss.item()
    assert probe.base == pytest.approx(dense, rel=1e-5)
    g = groups[5]  # layer 2 mlp: the probe re-runs layers 2.. from cached inputs
    removed = torch.tensor([0, 3, 7])
    measured = probe.loss({5: (g, removed)})
    reference = zero_removed(make_tiny_llama(9, 3), [g], [torch.tensor(sorted(set(range(g.n_units)) - {0, 3, 7}))])
    with torch.no_grad():
        assert measured == pytest.approx(reference(input_ids=batches[0], labels=batches[0]).loss.item(), rel=1e-5)
    assert probe.loss({}) == probe.base
    assert probe.loss({5: (g, removed)}) == measured  # weights restored, same answer


def test_measured_knapsack_matches_brute_force_on_its_curves():
    from prunekit.allocation.builtin import knapsack

    model, adapter, groups, scores = setup("mha4", layers=range(2))
    ctx = context(model, adapter, groups, scores, 0.05)
    curves = []
    for i, g in enumerate(groups):  # convex curves with different curvatures
        step = max(1, g.n_units // 4)
        curves.append([(c, (1 + i) * (c / g.n_units) ** 2) for c in range(0, g.n_units, step)])
    counts = knapsack(ctx, curves)
    assert ctx.removed_params(counts) <= ctx.budget.params

    def loss(i, c):
        xs, ys = zip(*curves[i])
        return float(torch.tensor(ys)[torch.tensor(xs) == c][0]) if c in xs else None

    best = min((sum(loss(i, c) for i, c in enumerate(cs))
                for cs in itertools.product(*[[p[0] for p in cv] for cv in curves])
                if ctx.removed_params(list(cs)) <= ctx.budget.params
                and ctx.removed_params(list(cs)) >= ctx.removed_params(counts)), default=None)
    ours = sum((1 + i) * (c / g.n_units) ** 2 for i, (g, c) in enumerate(zip(groups, counts)))
    assert best is None or ours <= best + 1e-9


def test_measured_max_excess_caps_every_group_near_uniform():
    model, adapter, groups, scores = setup("gqa8x2")
    ctx = context(model, adapter, groups, scores, 0.2)
    uniform, _ = run_allocator(ctx, "uniform", {})
    counts, _ = run_allocator(context(model, adapter, groups, scores, 0.2), "measured",
                              {"probe_samples": 2, "probe_seq_len": 12, "max_excess": 0.1})
    for g, c, u in zip(groups, counts, uniform):
        assert c / g.n_units <= u / g.n_units + 0.1 + 1e-9


def test_measured_may_leave_layers_untouched_and_records_its_table():
    model, adapter, groups, scores = setup("gqa4x2")
    ctx = context(model, adapter, groups, scores, 0.05)
    counts, info = run_allocator(ctx, "measured", {"probe_samples": 2, "probe_seq_len": 12})
    table = info["measured"]["loss_increase"]
    assert set(table) == {g.name for g in groups} and all(len(v) >= 1 for v in table.values())
    assert 0 in counts  # a small budget goes where it costs least, not everywhere


def _write(path, text):
    path.write_text(text)
    return path


def test_cli_params_removed_and_allocator_recorded(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _write(tmp_path / "c.yaml", "allocation:\n  layers: all\n  options: {probe_samples: 2, probe_seq_len: 16}\n"
                                      "calibration:\n  n_samples: 4\n  seq_len: 16\n")
    assert main(["run", "--no-eval", "--method", "taylor", "--model", str(tiny_model_dir), "--output", str(out),
                 "--params-removed", "0.2", "--allocator", "measured", "--config", str(cfg)]) == 0
    manifest = json.loads((out / "run.json").read_text())
    a, r = manifest["allocation"], manifest["reduction"]
    assert a["allocator"] == "measured" and a["budget"]["fraction"] == pytest.approx(0.2, abs=1e-6)
    assert r["params_before"] - r["params_after"] == a["params_removed"] <= a["budget"]["params"]
    assert manifest["layers_pruned"] == [0, 4]
    assert "removed" in capsys.readouterr().out


@pytest.mark.parametrize("args,field", [(["--allocator", "nope"], "allocators"),
                                        (["--params-removed", "1.5"], "allocation.params_removed")])
def test_cli_bad_allocation_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys, args, field):
    rc = main(["run", "--no-eval", "--method", "magnitude", "--model", str(tiny_model_dir), "--output",
               str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and field in err and len(err.strip().splitlines()) == 1


def test_bad_allocator_option_fails_before_any_work(tiny_model_dir, tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", "allocation:\n  name: measured\n  options: {fractions: [1.5]}\n")
    rc = main(["run", "--no-eval", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"),
               "--config", str(cfg)])
    assert rc == 2 and "allocation.options.fractions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_benchmark_windows_are_the_cli_windows_spread_over_the_whole_split(monkeypatch):
    """The benchmarks' perplexity and the CLI's are computed on the same windows (one selection)."""
    from prunekit.benchmarks import quality
    from prunekit.eval.perplexity import token_windows

    ids = torch.arange(1000)
    windows = token_windows(ids, 10, 5)
    assert windows.shape == (5, 10)
    assert [int(w[0]) for w in windows] == [100, 300, 500, 700, 900]  # the middle of each fifth of the split
    seen = []

    def window_nll(model, batch):
        seen.append(batch)
        return 1.0, batch.shape[0] * 9

    class Wb:  # the workbench fields spaced_ppl reads
        tokenizer, cache = None, {}
        profile = type("P", (), {"ppl_window": 10, "ppl_batch": 8})

    monkeypatch.setattr("prunekit.data.sources.load_text", lambda corpus, split: None)
    monkeypatch.setattr("prunekit.data.sources.token_ids", lambda tok, text: ids)
    monkeypatch.setattr("prunekit.eval.perplexity.window_nll", window_nll)
    quality.spaced_ppl(Wb(), torch.nn.Linear(1, 1), "ptb", "test", 5)
    assert torch.equal(torch.cat(seen), windows)


def test_quality_suite_compares_allocators_at_equal_parameters(tiny_model_dir, tmp_path):
    from prunekit.benchmarks import harness

    out = tmp_path / "bench"
    assert harness.main(["--model", str(tiny_model_dir), "--suite", "quality", "--methods", "magnitude",
                         "--params-removed", "0.2", "--allocators", "uniform,uniform-mlp,global", "--seeds", "0",
                         "--ppl-windows", "3", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    record = json.loads((out / "allocation-magnitude.json").read_text())
    assert {r["allocation"] for r in record["rows"]} == {"uniform", "uniform-mlp", "global"}
    for row in record["rows"]:
        assert row["params_removed_fraction"] <= 0.2 and row["ppl"]["ptb"] > 1
    assert "## Allocators at equal parameters removed" in (out / "report.md").read_text()
    assert (out / "allocation_magnitude.png").exists()


def test_rebased_probe_replays_from_a_later_layer_exactly():
    """After ``rebase`` on one allocation, a candidate that differs only in later layers re-run from there
    gives the loss of a full pass with every removal applied."""
    model, adapter, groups, scores = setup("gqa9x3")
    probe = LossProbe(model, adapter.layers(), [torch.arange(48).view(4, 12) % 96])
    early = {1: (groups[1], torch.tensor([1, 4])), 5: (groups[5], torch.tensor([0, 3, 7]))}
    late = {**early, 7: (groups[7], torch.tensor([2, 5, 9, 11]))}
    full = probe.loss(late)
    assert probe.rebase(early) == pytest.approx(probe.loss(early), rel=1e-6)
    assert probe.loss(late, start=groups[7].layer) == pytest.approx(full, rel=1e-6)


def test_adopting_a_remembered_pass_equals_rebasing():
    """A kept search move adopts the layer inputs its own partial pass computed: later calls from any layer give
    what they give after a full re-record (``rebase``) of that allocation."""
    model, adapter, groups, scores = setup("gqa9x3")
    batches = [torch.arange(48).view(4, 12) % 96]
    early = {1: (groups[1], torch.tensor([1, 4]))}
    moved = {**early, 5: (groups[5], torch.tensor([0, 3, 7]))}
    later = {**moved, 7: (groups[7], torch.tensor([2, 5, 9, 11]))}
    adopted, rebased = LossProbe(model, adapter.layers(), batches), LossProbe(model, adapter.layers(), batches)
    adopted.rebase(early)
    loss = adopted.loss(moved, start=groups[5].layer, remember=True)
    assert adopted.adopt() and not adopted.adopt()  # adopted once
    assert rebased.rebase(moved) == pytest.approx(loss, rel=1e-6)
    for start in (groups[5].layer, groups[7].layer):
        assert adopted.loss(later, start=start) == pytest.approx(rebased.loss(later, start=start), rel=1e-6)


def test_measured_skips_levels_past_each_cap_and_allocates_as_with_all_of_them():
    """Levels past the first one at or above a group's cap are never read by the capped knapsack: the allocator
    does not measure them, and its counts equal those from the full curves."""
    from prunekit.allocation.builtin import Measured, capped, caps, knapsack

    model, adapter, groups, scores = setup("gqa9x3")
    o = Measured.Options(probe_samples=2, probe_seq_len=12, max_excess=0.1, search_steps=0,
                         fractions=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    full_ctx, lean_ctx = (context(model, adapter, groups, scores, 0.25) for _ in range(2))
    full = Measured(o).curves(full_ctx)
    limits = caps(lean_ctx, o.kinds, o.max_excess)
    lean = Measured(o).curves(lean_ctx, limits)
    assert sum(map(len, lean)) < sum(map(len, full))
    for points, complete, cap in zip(lean, full, limits):
        assert points == complete[:len(points)]  # same measurements, cut after the cap's neighbour
        assert len(points) == len(complete) or points[-1][0] >= cap
    assert knapsack(lean_ctx, capped(lean_ctx, lean, o.kinds, 0.1)) == \
        knapsack(full_ctx, capped(full_ctx, full, o.kinds, 0.1))
    assert Measured(o).allocate(context(model, adapter, groups, scores, 0.25)) == \
        knapsack(full_ctx, capped(full_ctx, full, o.kinds, 0.1))


def test_search_never_raises_the_joint_probe_loss_and_stays_in_budget():
    from prunekit.allocation.builtin import Measured, caps, knapsack
    from prunekit.allocation.search import local_search

    model, adapter, groups, scores = setup("gqa9x3")
    ctx = context(model, adapter, groups, scores, 0.25)
    o = Measured.Options(probe_samples=2, probe_seq_len=12, max_excess=None)
    start = knapsack(ctx, Measured(o).curves(ctx))
    probe = ctx.loss_probe(4, 12)
    eligible = list(range(len(groups)))
    result = local_search(ctx, start, probe, 12, caps(ctx, o.kinds, None), eligible, 0.25)
    assert result.steps == 12 and result.loss <= result.start_loss
    assert ctx.removed_params(result.counts) <= ctx.budget.params
    removed = {i: (g, ctx.removal(i, c)) for i, (g, c) in enumerate(zip(groups, result.counts)) if c}
    assert LossProbe(model, adapter.layers(), probe.batches).loss(removed) == pytest.approx(result.loss, rel=1e-6)
    if result.accepted:
        assert result.counts != start and result.loss < result.start_loss


def test_measured_without_tokenizer_fails_early_or_uses_the_given_batches():
    from prunekit.core.config import RunConfig
    from prunekit.pipeline.prune import prune_with_config

    model = make_tiny_llama(9, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = RunConfig(method="magnitude", allocation={"name": "measured", "params_removed": 0.2,
                                                      "options": {"probe_samples": 2, "probe_seq_len": 12}},
                       evaluation={"enabled": False}, device="cpu")
    with pytest.raises(UserError, match="tokenizer.*measured"):
        prune_with_config(model, None, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    batches = [torch.arange(64).view(4, 16) % 96]
    result = prune_with_config(model, None, config.model_copy(update={"method": "taylor"}), batches=batches)
    assert result.allocation["allocator"] == "measured" and 0 < result.allocation["params_removed_fraction"] <= 0.2


@pytest.mark.study
def test_allocation_study_tunes_and_measures_throughput_per_allocation(tiny_model_dir, tmp_path):
    from prunekit.benchmarks.studies import allocation_study

    common = ["--model", str(tiny_model_dir), "--methods", "magnitude", "--seeds", "0", "--fractions", "0.2",
              "--windows", "3", "--out", str(tmp_path)]
    allocation_study.main([*common, "--phase", "tune", "--candidates", "uniform,measured+search"])
    rows = [json.loads(line) for line in (tmp_path / "allocation-rows.jsonl").read_text().splitlines()]
    assert [r["allocation"] for r in rows] == ["uniform", "measured+search"]
    assert all(0 < r["params_removed_fraction"] <= 0.2 and r["ppl"]["ptb"] > 1 for r in rows)
    allocation_study.main([*common, "--phase", "cost", "--chosen", "measured+search"])
    cost = json.loads((tmp_path / "allocation-cost-magnitude.json").read_text())
    assert [r["allocation"] for r in cost["rows"]] == ["uniform", "uniform-mlp", "measured+search"]
    for r in cost["rows"]:
        assert r["prefill_speedup"] > 0 and r["decode_speedup"] > 0 and 0 < r["params_removed_fraction"] <= 0.2
    from prunekit.benchmarks.studies.allocation_budgets import cost_table

    lines = cost_table([cost, cost])  # repeat runs: median (min–max); here all three equal
    assert len(lines) == 2 + 3 and f"{cost['rows'][0]['decode_speedup']:.3f} (" in lines[2]


def test_layers_follow_the_allocator_and_an_unnamed_measured_default_falls_back_without_text():
    from prunekit.allocation.plan import default_allocator_fallback, layers_mode
    from prunekit.core.config import AllocationConfig, RunConfig
    from prunekit.pipeline.prune import prune

    assert layers_mode(RunConfig()) == "all"  # the default allocator, measured, decides which layers to touch
    assert layers_mode(RunConfig(allocation={"name": "uniform"})) == "default"  # uniform: LLM-Pruner's range
    assert layers_mode(RunConfig(allocation={"name": "measured"})) == "all"
    assert layers_mode(RunConfig(allocation={"name": "measured", "layers": "default"})) == "default"
    unnamed = RunConfig(method="magnitude",
                        allocation=AllocationConfig.model_construct(_fields_set=set(), name="measured"))
    assert default_allocator_fallback(unnamed, get_registry(), None, None).allocation.name == "uniform"
    named = RunConfig(method="magnitude", allocation={"name": "measured"})
    assert default_allocator_fallback(named, get_registry(), None, None) is named
    result = prune(make_tiny_llama(9, 3), None, method="magnitude", ratio=0.34, allocation={"name": "global"})
    assert result.allocation["allocator"] == "global"


def test_a_ratio_budget_means_the_uniform_ratio_over_llm_pruners_layers_whatever_the_allocator_touches():
    """The default (measured, all layers as candidates) removes what `--ratio` removes uniformly over the
    default layer range, not that ratio of every layer."""
    from prunekit.pipeline.prune import prune

    model = make_tiny_llama(9, 3, layers=8)  # LLM-Pruner's range for 8 layers: 1-7
    tokenizer = make_tiny_tokenizer()
    uniform = prune(copy.deepcopy(model), tokenizer, "magnitude", 0.34, allocation={"name": "uniform"},
                    calibration={"n_samples": 4, "seq_len": 16})
    measured = prune(copy.deepcopy(model), tokenizer, "magnitude", 0.34, calibration={"n_samples": 4, "seq_len": 16})
    assert measured.allocation["allocator"] == "measured" and "layers.0.mlp" in measured.mask  # layer 0 a candidate
    assert "layers.0.mlp" not in uniform.mask  # LLM-Pruner's range for 8 layers is 1-7
    assert measured.allocation["budget"]["params"] == uniform.allocation["params_removed"] > 0
    assert measured.allocation["params_removed"] <= measured.allocation["budget"]["params"]


def test_the_allocation_bench_allocates_measured_as_a_run_would(tiny_model_dir, one_thread):
    """The study's measured rows (curves measured once per seed, reused across budgets) are the counts the
    allocator itself returns with the same options, its defaults included (max_excess caps the knapsack)."""
    from prunekit.allocation.builtin import Measured
    from prunekit.benchmarks.profiles import PROFILES
    from prunekit.benchmarks.quality import AllocationBench
    from prunekit.benchmarks.workbench import Workbench

    wb = Workbench.open(str(tiny_model_dir), PROFILES["quick"], "cpu")
    options = {"probe_samples": 2, "probe_seq_len": 16, "search_steps": 0}
    bench = AllocationBench(wb, "magnitude", 0, options)
    differs_uncapped = False
    for fraction in (0.1, 0.2, 0.35):
        idx, counts, _ = bench.counts("measured", options, "all", fraction)
        fresh = bench.context(idx, fraction)
        assert counts == Measured(Measured.Options(**options)).allocate(fresh)
        _, uncapped, _ = bench.counts("measured", {**options, "max_excess": None}, "all", fraction)
        differs_uncapped |= uncapped != counts
        assert sum(c * bench.costs[i] for i, c in zip(idx, counts)) <= int(fraction * wb.model.num_parameters())
    assert differs_uncapped  # the cap is in force (the bench once dropped it)


@pytest.mark.study
def test_allocation_study_test_phase_takes_other_budgets_and_global(tiny_model_dir, tmp_path, one_thread):
    from prunekit.benchmarks.studies import allocation_study

    allocation_study.main(["--model", str(tiny_model_dir), "--methods", "magnitude", "--seeds", "0", "--windows", "3",
                           "--fractions", "0.1,0.35", "--phase", "test", "--out", str(tmp_path),
                           "--allocations", "uniform,global"])
    rows = [json.loads(line) for line in (tmp_path / "allocation-rows.jsonl").read_text().splitlines()]
    assert [(r["allocation"], r["budget"]) for r in rows] == [("uniform", 0.1), ("global", 0.1), ("uniform", 0.35),
                                                             ("global", 0.35)]
    for r in rows:
        assert 0 < r["params_removed_fraction"] <= r["budget"] and set(r["ppl"]) == {"ptb", "wikitext2"}
    with pytest.raises(SystemExit):
        allocation_study.main(["--out", str(tmp_path), "--phase", "test", "--allocations", "uniform,nope"])
    from prunekit.benchmarks.studies import allocation_budgets

    rows_path, png = tmp_path / "rows.jsonl", tmp_path / "budgets.png"
    allocation_budgets.main(["--rows", str(rows_path), "--collect", str(tmp_path), "--plot", str(png)])
    collected = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert [r["allocation"] for r in collected] == ["dense", "uniform", "global", "uniform", "global"]
    lines = allocation_budgets.quality_table(collected)
    uniform = [line for line in lines if line.startswith("| uniform")]
    assert len(uniform) == 2 and all(line.count("| 1.000 |") == 2 for line in uniform)
    assert png.stat().st_size > 10_000
