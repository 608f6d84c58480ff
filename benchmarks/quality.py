"""Quality suite: perplexity (and optionally zero-shot accuracy) of each method's pruned model at several ratios.

Scores do not depend on the ratio, so each (method, seed) is scored once and selected at every ratio.
"""

from __future__ import annotations

import logging
import statistics
import time

from prunekit.benchmarks.metrics import summary
from prunekit.benchmarks.workbench import Workbench
from prunekit.data.sources import calibration_batches

log = logging.getLogger("benchmarks")


def zero_shot_mean(wb: Workbench, model, limit: int | None) -> dict:
    """Mean zero-shot accuracy over prunekit's task list (lm-eval on the local task data)."""
    from prunekit.eval.zero_shot import zero_shot

    result = zero_shot(model, wb.tokenizer, limit=limit, batch_size=wb.profile.ppl_batch)
    return {"mean": result.get("mean"), "detail": result}


def dense_zero_shot_mean(wb: Workbench) -> float:
    """Zero-shot mean of the unpruned model, measured once per workbench (every method shares it)."""
    if "zero_shot_mean" not in wb.cache:
        wb.cache["zero_shot_mean"] = zero_shot_mean(wb, wb.model, wb.profile.zero_shot_limit)["mean"]
    return wb.cache["zero_shot_mean"]


def one_seed(wb: Workbench, method: str, ratios: tuple[float, ...], seed: int, zero_shot: bool) -> list[dict]:
    """Pruned perplexities at every ratio for one seed."""
    entry = wb.method(method)
    batches, _ = wb.calibration(seed) if entry.needs_calibration() else ([], None)
    groups = wb.groups(wb.model)
    scores, _, seconds = wb.score(wb.model, groups, method, batches, seed)
    rows = []
    for ratio in ratios:
        pruned = wb.pruned(wb.model, groups, wb.keep(groups, scores, ratio))
        row = {"ratio": ratio, "seed": seed, "params": pruned.num_parameters(),
               "ppl": {c: wb.ppl(pruned, c) for c in wb.profile.quality_corpora}, "score_seconds": seconds}
        if zero_shot:
            row["zero_shot"] = zero_shot_mean(wb, pruned, wb.profile.zero_shot_limit)
        log.info("quality %s seed %d ratio %.2f: %s", method, seed, ratio, row["ppl"])
        rows.append(row)
    return rows


def run(wb: Workbench, method: str, ratios: tuple[float, ...], seeds: list[int], zero_shot: bool = False) -> dict:
    """The quality record of one method: every (seed, ratio) row and per-ratio mean ± spread."""
    started = time.perf_counter()
    rows = [r for seed in seeds for r in one_seed(wb, method, ratios, seed, zero_shot)]
    by_ratio = {}
    for ratio in ratios:
        at = [r for r in rows if r["ratio"] == ratio]
        by_ratio[str(ratio)] = {f"ppl_{c}": summary([r["ppl"][c] for r in at]) for c in wb.profile.quality_corpora}
        by_ratio[str(ratio)]["params"] = statistics.fmean(r["params"] for r in at)
        if zero_shot:
            by_ratio[str(ratio)]["zero_shot_mean"] = summary([r["zero_shot"]["mean"] for r in at])
    dense = {"params": wb.model.num_parameters(), **{f"ppl_{c}": wb.dense_ppl(c) for c in wb.profile.quality_corpora}}
    if zero_shot:
        dense["zero_shot_mean"] = dense_zero_shot_mean(wb)
    return {"suite": "quality", "method": method, "ratios": list(ratios), "seeds": seeds, "rows": rows,
            "by_ratio": by_ratio, "dense": dense, "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------ allocators at equal parameters removed

#: (label, allocator, options, layers) compared by :func:`allocation_run`; "default" layers are the
#: pipeline's LLM-Pruner range, "all" lets the allocator decide.
ALLOCATIONS: tuple[tuple[str, str, dict, str], ...] = (
    ("uniform", "uniform", {}, "default"),
    ("uniform-mlp", "uniform", {"kinds": ["mlp"]}, "default"),
    ("global", "global", {}, "default"),
    ("measured", "measured", {}, "all"),
)


def spaced_ppl(wb: Workbench, model, corpus: str, split: str, n_windows: int) -> float:
    """Perplexity on evenly spaced 128-token windows of a corpus split."""
    import math

    from prunekit.data.sources import load_text, token_ids
    from prunekit.eval.perplexity import token_windows, window_nll
    from prunekit.runtime.modelstate import eval_mode

    key = ("spaced", corpus, split, n_windows)
    if key not in wb.cache:
        wb.cache[key] = token_windows(token_ids(wb.tokenizer, load_text(corpus, split)), wb.profile.ppl_window,
                                      n_windows)
    windows, total, count = wb.cache[key], 0.0, 0
    import torch

    with torch.no_grad(), eval_mode(model):
        for first in range(0, len(windows), wb.profile.ppl_batch):
            nll, n = window_nll(model, windows[first:first + wb.profile.ppl_batch])
            total, count = total + nll, count + n
    return math.exp(total / count)


class AllocationBench:
    """Scores once per seed on every layer's groups, measures the sensitivity curves once per seed, and
    allocates any (allocator, budget) from them; the pruned copies are evaluated, the dense model kept."""

    def __init__(self, wb: Workbench, method: str, seed: int, probe: dict | None = None):
        """Score ``method`` with calibration ``seed`` on every layer's groups; ``probe``: measured options."""
        from prunekit.adapters.grouping import GrouperOptions
        from prunekit.core.budget import unit_cost

        self.wb, self.method, self.seed = wb, method, seed
        adapter = wb.adapter(wb.model)
        build = wb.registry.named("groupers", "blocks").impl
        self.groups = build(wb.model, adapter, range(adapter.num_layers), GrouperOptions())
        batches, _ = wb.calibration(seed)
        self.scores, _, self.score_seconds = wb.score(wb.model, self.groups, method, batches, seed)
        self.costs = [unit_cost(wb.model, g) for g in self.groups]
        self.layers = adapter.layers()
        self.probe_options = probe or {}
        self._curves = None
        self._search_probes: dict = {}  # (windows, tokens) -> the local search's loss probe
        self.probe_seconds = 0.0

    def subset(self, layers: str) -> list[int]:
        """Indices of the groups in the pruned layer range."""
        keep = self.wb.layers if layers == "default" else range(len(self.layers))
        return [i for i, g in enumerate(self.groups) if g.layer in keep]

    def context(self, idx: list[int], fraction: float):
        from prunekit.allocation.base import AllocationContext
        from prunekit.core.budget import Budget

        wb, p = self.wb, self.wb.profile

        def sample(n: int, seq_len: int):
            ids, _ = calibration_batches(wb.tokenizer, p.calib_source, n, seq_len, self.seed + 1)
            return list(ids.split(8))

        total = wb.model.num_parameters()
        return AllocationContext(model=wb.model, groups=[self.groups[i] for i in idx],
                                 scores=[self.scores[i] for i in idx], costs=[self.costs[i] for i in idx],
                                 budget=Budget(params=int(fraction * total), total=total), seed=self.seed,
                                 layers=self.layers, sample=sample)

    def curves(self):
        """Sensitivity curves of every group (measured once, on every layer; kept in ``wb.cache['curves_dir']``
        as JSON when that is set, so a later process reuses them)."""
        import json
        from pathlib import Path

        folder = self.wb.cache.get("curves_dir")
        path = (Path(folder) / f"curves-{self.method}-{self.seed}-{json.dumps(self.probe_options, sort_keys=True)}.json"
                if folder else None)
        if self._curves is None and path is not None and path.exists():
            self._curves = [[tuple(p) for p in c] for c in json.loads(path.read_text())]
        if self._curves is None:
            from prunekit.allocation.builtin import Measured

            started = time.perf_counter()
            ctx = self.context(list(range(len(self.groups))), 0.5)
            self._curves = Measured(Measured.Options(**self.probe_options)).curves(ctx)
            self.probe_seconds = time.perf_counter() - started
            if path is not None:
                path.write_text(json.dumps(self._curves))
        return self._curves

    def counts(self, allocator: str, options: dict, layers: str, fraction: float):
        """(group indices, counts, allocation context) of one allocator at one budget."""
        import prunekit.allocation.builtin as builtin
        from prunekit.allocation.base import check_counts

        idx = self.subset(layers)
        ctx = self.context(idx, fraction)
        if allocator == "measured":
            o = builtin.Measured.Options(**options)  # its defaults, as a run gets them (max_excess 0.2)
            curves = [self.curves()[i] if self.groups[i].kind in o.kinds else [(0, 0.0)] for i in idx]
            counts = builtin.knapsack(ctx, builtin.capped(ctx, curves, o.kinds, o.max_excess))
            counts = builtin.refine(ctx, counts, o, self.search_probe(ctx, options))
        else:
            impl = self.wb.registry.named("allocators", allocator).impl
            counts = impl(impl.Options(**options)).allocate(ctx)
        check_counts(ctx, counts, allocator)
        return idx, counts, ctx

    def search_probe(self, ctx, options: dict):
        """The loss probe of the measured allocator's local search, one per probe size (None: no search)."""
        from prunekit.allocation.builtin import Measured

        o = Measured.Options(**options)
        if not o.search_steps:
            return None
        key = (o.search_samples or o.probe_samples, o.probe_seq_len)
        if key not in self._search_probes:
            self._search_probes[key] = ctx.loss_probe(*key)
        return self._search_probes[key]

    def pruned(self, idx: list[int], counts: list[int]):
        from prunekit.core.select import keep_from_counts

        groups = [self.groups[i] for i in idx]
        return self.wb.pruned(self.wb.model, groups, keep_from_counts(groups, [self.scores[i] for i in idx], counts))


def allocation_run(wb: Workbench, method: str, fractions: tuple[float, ...], seeds: list[int],
                   allocations=ALLOCATIONS, n_windows: int = 100, corpora: tuple[str, ...] = ("ptb", "wikitext2"),
                   split: str = "test", on_row=None, probe: dict | None = None) -> dict:
    """Perplexity of every allocation at equal parameters removed, per seed; rows carry the achieved fraction."""
    started, rows = time.perf_counter(), []
    dense = {"params": wb.model.num_parameters(), **{f"ppl_{c}": spaced_ppl(wb, wb.model, c, split, n_windows)
                                                      for c in corpora}}
    for seed in seeds:
        key = ("allocation-bench", method, seed)
        bench = wb.cache.get(key) or wb.cache.setdefault(key, AllocationBench(wb, method, seed, probe))
        for fraction in fractions:
            for label, allocator, options, layers in allocations:
                idx, counts, ctx = bench.counts(allocator, options, layers, fraction)
                model = bench.pruned(idx, counts)
                row = {"allocation": label, "allocator": allocator, "options": options, "layers": layers,
                       "seed": seed, "budget": fraction, "params": model.num_parameters(),
                       "params_removed_fraction": 1 - model.num_parameters() / dense["params"],
                       "ppl": {c: spaced_ppl(wb, model, c, split, n_windows) for c in corpora},
                       "score_seconds": round(bench.score_seconds, 1), "probe_seconds": round(bench.probe_seconds, 1),
                       "counts": {bench.groups[i].name: c for i, c in zip(idx, counts)}}
                log.info("allocation %s seed %d budget %.3f: removed %.4f ppl %s", label, seed, fraction,
                         row["params_removed_fraction"], row["ppl"])
                rows.append(row)
                if on_row:
                    on_row(row)
    summary_rows = {}
    for fraction in fractions:
        for label, *_ in allocations:
            at = [r for r in rows if r["budget"] == fraction and r["allocation"] == label]
            if at:
                summary_rows[f"{label}@{fraction}"] = {
                    "allocation": label, "budget": fraction,
                    "params_removed_fraction": statistics.fmean(r["params_removed_fraction"] for r in at),
                    **{f"ppl_{c}": summary([r["ppl"][c] for r in at]) for c in corpora}}
    return {"suite": "allocation", "method": method, "fractions": list(fractions), "seeds": seeds,
            "n_windows": n_windows, "split": split, "rows": rows, "summary": summary_rows, "dense": dense,
            "seconds": round(time.perf_counter() - started, 1)}


def allocation_section(records: list[dict], out) -> list[str]:
    """Markdown: perplexity per allocation at each parameter budget (mean ± spread over seeds), and a plot."""
    from prunekit.benchmarks.report import pm, table

    lines = ["## Allocators at equal parameters removed", ""]
    for rec in records:
        if "summary" not in rec:
            continue
        corpora = [k[4:] for k in rec["dense"] if k.startswith("ppl_")]
        lines += [f"{rec['method']} scores, seeds {rec['seeds']}, {rec['n_windows']} evenly spaced "
                  f"{rec.get('window', 128)}-token windows of each {rec['split']} split; mean ± spread over seeds. "
                  "Dense: " + ", ".join(f"{c} {rec['dense'][f'ppl_{c}']:.2f}" for c in corpora) + ".", ""]
        rows = [[s["allocation"], f"{100 * s['budget']:.1f} %", f"{100 * s['params_removed_fraction']:.2f} %",
                 *(pm(s[f"ppl_{c}"], 1) for c in corpora)] for s in rec["summary"].values()]
        lines += table(["allocation", "budget", "removed", *(f"{c} ppl" for c in corpora)], rows)
        plot = ppl_vs_params(rec, out / f"allocation_{rec['method']}.png")
        lines += ["", f"![perplexity vs parameters removed]({plot.name})", ""]
    return lines


def ppl_vs_params(record: dict, path):
    """Mean PTB/WikiText-2 perplexity against the fraction of parameters removed, one line per allocation."""
    from prunekit.benchmarks.plots import _save, plt

    corpora = [k[4:] for k in record["dense"] if k.startswith("ppl_")]
    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4), squeeze=False)
    labels = list(dict.fromkeys(s["allocation"] for s in record["summary"].values()))
    for ax, corpus in zip(axes[0], corpora):
        for label in labels:
            pts = sorted((100 * s["params_removed_fraction"], s[f"ppl_{corpus}"]["mean"])
                         for s in record["summary"].values() if s["allocation"] == label)
            ax.plot([0] + [x for x, _ in pts], [record["dense"][f"ppl_{corpus}"]] + [y for _, y in pts],
                    marker="o", label=label)
        ax.set_xlabel("parameters removed (%)")
        ax.set_ylabel(f"{corpus} perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def allocation_suite(wb: Workbench, method: str, fractions: str, labels: str | None, seeds: list[int]) -> dict:
    """The harness's ``--suite quality --params-removed F,..`` entry: allocators compared at equal parameters."""
    from prunekit.errors import UserError

    known = {a[0]: a for a in ALLOCATIONS}
    wanted = [x.strip() for x in labels.split(",")] if labels else list(known)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise UserError(f"--allocators: unknown {unknown}; accepted: {', '.join(known)}")
    return allocation_run(wb, method, tuple(float(f) for f in fractions.split(",")), seeds,
                          tuple(known[w] for w in wanted), n_windows=wb.profile.ppl_max_windows or 100,
                          corpora=wb.profile.quality_corpora)
