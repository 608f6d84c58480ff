"""Summary of a full-test-set evaluation folder (:mod:`prunekit.benchmarks.studies.full_eval`): tables, choices, plots.

Reads DIR/run.json (cells, seeds, run settings), DIR/rows.jsonl and DIR/masks.jsonl; writes DIR/summary.json
and DIR/summary.md (the markdown for docs/benchmarks.md) and, with plots, full_eval_*.png. Per cell:
perplexity per seed and its mean / min / max over seeds on every set, parameters removed, scoring time
and cost in default-taylor passes, and the mean pairwise IoU of the removed units across seeds. Choices
look at PTB validation only: per method (issue 13, at most ``MAX_COST`` taylor passes) and per method and
budget (issue 14); the test columns report them.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from prunekit.runtime.atomic import write_text
from prunekit.benchmarks.metrics import iou, summary

SETS = ("ptb_validation", "ptb_test", "wikitext2_test")
TESTS = ("ptb_test", "wikitext2_test")
REFERENCE_13 = "i13/taylor-10x64"
MAX_COST = 10.0
TARGET_13, TARGET_14 = 0.95, 0.75


def read(out: Path) -> tuple[dict, list[dict]]:
    """run.json (cells, seeds, meta) and the rows."""
    from prunekit.benchmarks.studies.full_eval import RUN, read_rows

    grid = json.loads((out / RUN).read_text()) if (out / RUN).exists() else {"cells": [], "seeds": []}
    return grid, read_rows(out)


def cost_passes(config: dict) -> float | None:
    """Calibration sequences back-propagated over the default taylor's 10 (``sweep.Point.passes``)."""
    from prunekit.benchmarks.sweep import Point

    samples = (config.get("calibration") or {}).get("n_samples", 10)
    if config["method"] not in ("taylor", "fisher", "moreau", "moreau-gs"):
        return None
    return Point(config["method"], config.get("method_options") or {}, samples).passes()


def read_masks(out: Path) -> dict[tuple[str, int], dict[str, list[int]]]:
    """Removed units per group of every (cell, seed) in DIR/masks.jsonl (the latest line wins)."""
    from prunekit.benchmarks.studies.full_eval import MASKS, read_rows

    return {(m["cell"], m["seed"]): m["removed"] for m in read_rows(out, MASKS)}


def removed_iou(masks: dict, rows: list[dict]) -> float | None:
    """Mean pairwise IoU of the removed (group, unit) sets of the rows (None below two seeds)."""
    sets = [{(g, u) for g, units in masks[(r["cell"], r["seed"])].items() for u in units}
            for r in rows if (r["cell"], r["seed"]) in masks]
    pairs = list(itertools.combinations(sets, 2))
    return statistics.fmean(iou(a, b) for a, b in pairs) if pairs else None


def summarize(out: Path, meta: dict | None = None) -> dict[str, Any]:
    """The summary record of a results folder (see the module docstring)."""
    grid, rows = read(out)
    masks = read_masks(out)
    latest: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r.get("kind") == "cell":
            latest[(r["cell"], r["seed"])] = r
    dense = next((r for r in reversed(rows) if r.get("kind") == "dense"), None)
    cells: list[dict] = []
    for cell in grid["cells"]:
        mine = sorted((r for (cid, _), r in latest.items() if cid == cell["id"]), key=lambda r: r["seed"])
        entry = {k: cell.get(k) for k in ("id", "issue", "label", "allocator", "budget", "tier")}
        entry.update(method=cell["config"]["method"], config=cell["config"], seeds=[r["seed"] for r in mine],
                     cost_taylor_passes=cost_passes(cell["config"]))
        if mine:
            entry["ppl"] = {s: summary([r["eval"][s]["ppl"] for r in mine]) for s in SETS}
            entry["ppl_per_seed"] = {s: [round(r["eval"][s]["ppl"], 3) for r in mine] for s in SETS}
            entry["n_windows"] = {s: mine[0]["eval"][s]["n_windows"] for s in SETS}
            entry["params_removed_fraction"] = statistics.fmean(r["params_removed_fraction"] for r in mine)
            entry["score_seconds"] = summary([r["timings"].get("score") for r in mine])
            entry["timings"] = {k: statistics.fmean(r["timings"][k] for r in mine)
                                for k in ("groups", "allocate_select", "apply", "evaluate")}
            entry["removed_iou"] = removed_iou(masks, mine)
        cells.append(entry)
    by_id = {c["id"]: c for c in cells}
    reference = by_id.get(REFERENCE_13, {})
    unit = (reference.get("score_seconds") or {}).get("mean")
    for c in cells:
        if "ppl" not in c:
            continue
        if c["issue"] == "13":
            ref = reference.get("ppl")
            c["time_over_taylor"] = c["score_seconds"]["mean"] / unit if unit and c.get("score_seconds") else None
        else:
            base = next((u for u in cells if u["issue"] == "14" and u.get("allocator") == "uniform"
                         and u["method"] == c["method"] and u.get("budget") == c.get("budget")), {})
            ref = base.get("ppl")
        c["ratio_to_reference"] = {s: c["ppl"][s]["mean"] / ref[s]["mean"] for s in SETS} if ref else None
    record = {"meta": meta, "seeds": grid["seeds"], "expected": len(grid["cells"]) * len(grid["seeds"]),
              "complete": sum(len(c["seeds"]) for c in cells), "dense": dense and {
                  "params": dense["params"], "ppl": {s: dense["eval"][s]["ppl"] for s in SETS},
                  "n_windows": {s: dense["eval"][s]["n_windows"] for s in SETS}},
              "cells": cells, "choices": choices(cells),
              "errors": [{k: r.get(k) for k in ("task", "cells", "seed", "error")} for r in rows if r.get("kind") == "error"
                         and not any((cid, r.get("seed")) in latest for cid in r.get("cells", []))]}
    record["verdicts"] = verdicts(record)
    return record


def _val(c: dict) -> float:
    return c["ppl"]["ptb_validation"]["mean"]


def choices(cells: list[dict]) -> dict[str, Any]:
    """Chosen on PTB validation only: issue 13 per method (<= MAX_COST taylor passes), issue 14 per (method, budget)."""
    done = [c for c in cells if "ppl" in c]
    out: dict[str, Any] = {"issue13": {}, "issue14": {}}
    for method in dict.fromkeys(c["method"] for c in done if c["issue"] == "13"):
        fits = [c for c in done if c["issue"] == "13" and c["method"] == method
                and (c["cost_taylor_passes"] or 0) <= MAX_COST]
        if fits:
            out["issue13"][method] = min(fits, key=_val)["id"]
    for c in (c for c in done if c["issue"] == "14"):
        key = f"{c['method']}@{c['budget']:g}"
        best = out["issue14"].get(key)
        if best is None or _val(c) < _val(next(x for x in done if x["id"] == best)):
            out["issue14"][key] = c["id"]
    return out


def verdicts(record: dict) -> list[str]:
    """The issues' "must show" targets against the measured means, one sentence each."""
    by_id = {c["id"]: c for c in record["cells"]}
    lines = []
    chosen = record["choices"]["issue13"].get("moreau-gs")
    if chosen and by_id[chosen].get("ratio_to_reference"):
        c = by_id[chosen]
        r = c["ratio_to_reference"]
        ok = all(r[s] <= TARGET_13 for s in TESTS)
        rivals = [by_id[record["choices"]["issue13"][m]] for m in ("taylor", "fisher") if m in record["choices"]["issue13"]]
        best = {s: min(x["ppl"][s]["mean"] for x in rivals) for s in TESTS} if rivals else None
        beats = best is not None and all(c["ppl"][s]["mean"] <= best[s] for s in TESTS)
        lines.append(f"issue 13: moreau-gs chosen on validation ({c['label']}) is {r['ptb_test']:.3f}x / "
                     f"{r['wikitext2_test']:.3f}x today's default taylor on PTB / WikiText-2 test: target <= "
                     f"{TARGET_13} {'met' if ok else 'NOT met'}; "
                     + ("no worse than the best of taylor/fisher chosen at <= 10 passes"
                        if beats else "worse than the best of taylor/fisher chosen at <= 10 passes"
                        if best else "taylor/fisher not measured"))
    for key, cid in record["choices"]["issue14"].items():
        c = by_id[cid]
        r = c.get("ratio_to_reference")
        if r:
            ok = all(r[s] <= TARGET_14 for s in TESTS)
            lines.append(f"issue 14 {key}: {c['allocator']} chosen on validation, {r['ptb_test']:.3f}x / "
                         f"{r['wikitext2_test']:.3f}x uniform on PTB / WikiText-2 test: target <= {TARGET_14} "
                         f"{'met' if ok else 'NOT met'}")
    return lines


# ------------------------------------------------------------------------------------------- markdown


def _pm(stat: dict | None, digits: int = 1) -> str:
    if not stat:
        return "—"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(record: dict, plots: list[Path] = ()) -> list[str]:
    """The section for docs/benchmarks.md."""
    meta = record.get("meta") or {}
    dense = record["dense"]
    lines = ["## Full test sets (issues 13 and 14), SmolLM2-135M", ""]
    windows = dense["n_windows"] if dense else {}
    lines += [f"`python -m prunekit.benchmarks.studies.full_eval {' '.join(meta.get('argv', [])[1:])}` on "
              f"{meta.get('cuda') or meta.get('device', '?')} ({meta.get('workers')} worker processes sharing it, "
              f"{meta.get('threads')} CPU threads each, torch {meta.get('torch')}, float32 "
              f"{'with TF32 matmuls' if meta.get('allow_tf32') else 'without TF32'}), "
              f"{record['complete']} of {record['expected']} (cell, seed) pairs in {meta.get('elapsed_s')} s. "
              f"Every non-overlapping 128-token window of each split (prunekit's perplexity convention): PTB "
              f"validation {windows.get('ptb_validation')}, PTB test {windows.get('ptb_test')}, WikiText-2 test "
              f"{windows.get('wikitext2_test')} windows. Perplexity: mean (min–max) over calibration seeds "
              f"{record['seeds']}; choices on PTB validation only. Scoring seconds are wall time (synchronised) "
              "with the other workers sharing the device, so compare them within this table only.", ""]
    if dense:
        lines += [f"Dense: PTB validation {dense['ppl']['ptb_validation']:.2f}, PTB test {dense['ppl']['ptb_test']:.2f}, "
                  f"WikiText-2 test {dense['ppl']['wikitext2_test']:.2f}.", ""]
    ch13 = set(record["choices"]["issue13"].values())
    rows13 = [c for c in record["cells"] if c["issue"] == "13"]
    if rows13:
        lines += ["### Issue 13: quality per unit of compute (ratio 0.25 of MLP channels, layers 4–27)", "",
                  "| cell | cost (taylor passes) | scoring s (× taylor) | removed IoU | PTB val | PTB test | × taylor | "
                  "WikiText-2 test | × taylor | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in rows13:
            if "ppl" not in c:
                lines.append(f"| {c['label']} | {c['cost_taylor_passes']:g} | not run | | | | | | | 0 |")
                continue
            r = c.get("ratio_to_reference") or {}
            name = f"**{c['label']}**" if c["id"] in ch13 else c["label"]
            t = c.get("time_over_taylor")
            lines.append(f"| {name} | {c['cost_taylor_passes']:g} | {c['score_seconds']['mean']:.2f}"
                         f"{f' ({t:.1f}×)' if t else ''} | {_x(c.get('removed_iou'))} | {_pm(c['ppl']['ptb_validation'])} | "
                         f"{_pm(c['ppl']['ptb_test'])} | {_x(r.get('ptb_test'))} | {_pm(c['ppl']['wikitext2_test'])} | "
                         f"{_x(r.get('wikitext2_test'))} | {len(c['seeds'])} |")
        lines += ["", "Bold: each method's choice on PTB validation at ≤ 10 taylor passes.", ""]
    rows14 = [c for c in record["cells"] if c["issue"] == "14"]
    if rows14:
        ch14 = set(record["choices"]["issue14"].values())
        lines += ["### Issue 14: allocators at equal parameters removed", "",
                  "| method | budget | allocator | removed | PTB val | PTB test | × uniform | WikiText-2 test | × uniform | "
                  "removed IoU | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted(rows14, key=lambda c: (c["method"], c["budget"] or 0)):
            if "ppl" not in c:
                lines.append(f"| {c['method']} | {100 * c['budget']:.1f} % | {c['allocator']} | not run | | | | | | | 0 |")
                continue
            r = c.get("ratio_to_reference") or {}
            name = f"**{c['allocator']}**" if c["id"] in ch14 else c["allocator"]
            lines.append(f"| {c['method']} | {100 * c['budget']:.1f} % | {name} | {100 * c['params_removed_fraction']:.2f} % | "
                         f"{_pm(c['ppl']['ptb_validation'])} | {_pm(c['ppl']['ptb_test'])} | {_x(r.get('ptb_test'))} | "
                         f"{_pm(c['ppl']['wikitext2_test'])} | {_x(r.get('wikitext2_test'))} | {_x(c.get('removed_iou'))} | "
                         f"{len(c['seeds'])} |")
        lines += ["", "Bold: the allocator chosen on PTB validation per method and budget; × uniform: over "
                      "`uniform` (heads + MLP, layers 4–27, today's) of the same method and budget.", ""]
    if record["verdicts"]:
        lines += ["Targets:", "", *(f"- {v}" for v in record["verdicts"]), ""]
    if record["errors"]:
        lines += ["Failed tasks:", "", *(f"- {e['task']}: {e['error']}" for e in record["errors"]), ""]
    for path in plots:
        lines += [f"![{path.stem}]({path.name})", ""]
    return lines


# ------------------------------------------------------------------------------------------- plots


def plots(record: dict, out: Path) -> list[Path]:
    """Perplexity vs parameters removed per allocator (one figure per method) and perplexity vs cost per method."""
    from prunekit.benchmarks.plots import _save, plt

    paths: list[Path] = []
    dense = record["dense"]
    done14 = [c for c in record["cells"] if c["issue"] == "14" and "ppl" in c]
    for method in dict.fromkeys(c["method"] for c in done14):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
        for ax, s in zip(axes[0], TESTS):
            for allocator in dict.fromkeys(c["allocator"] for c in done14):
                pts = sorted((100 * c["params_removed_fraction"], c["ppl"][s]) for c in done14
                             if c["method"] == method and c["allocator"] == allocator)
                xs = ([0.0] if dense else []) + [x for x, _ in pts]
                ys = ([dense["ppl"][s]] if dense else []) + [p["mean"] for _, p in pts]
                lo = ([0.0] if dense else []) + [p["mean"] - p["min"] for _, p in pts]
                hi = ([0.0] if dense else []) + [p["max"] - p["mean"] for _, p in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=allocator)
            ax.set_xlabel("parameters removed (%)")
            ax.set_ylabel(f"{s.replace('_', ' ')} perplexity (mean, min–max over seeds)")
            ax.set_yscale("log")
            ax.set_title(f"{method} scores")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        paths.append(_save(fig, out / f"full_eval_alloc_{method}.png"))
    done13 = [c for c in record["cells"] if c["issue"] == "13" and "ppl" in c and c["cost_taylor_passes"]]
    if done13:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
        for ax, s in zip(axes[0], SETS):
            for method in dict.fromkeys(c["method"] for c in done13):
                mine = sorted((c for c in done13 if c["method"] == method), key=lambda c: c["cost_taylor_passes"])
                ax.errorbar([c["cost_taylor_passes"] for c in mine], [c["ppl"][s]["mean"] for c in mine],
                            yerr=[[c["ppl"][s]["mean"] - c["ppl"][s]["min"] for c in mine],
                                  [c["ppl"][s]["max"] - c["ppl"][s]["mean"] for c in mine]],
                            marker="o", capsize=3, linestyle="", label=method)
            if dense:
                ax.axhline(dense["ppl"][s], color="gray", linestyle="--", label="dense")
            ax.set_xscale("log")
            ax.set_xlabel("scoring cost (default taylor passes)")
            ax.set_ylabel(f"{s.replace('_', ' ')} perplexity")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        paths.append(_save(fig, out / "full_eval_ppl_vs_cost.png"))
    return paths


def write_summary(out: Path, meta: dict | None = None, with_plots: bool = False) -> dict:
    """summary.json and summary.md of ``out`` (plots too when asked); returns the summary record."""
    from prunekit.benchmarks.studies.full_eval import RUN, SUMMARY_JSON, SUMMARY_MD

    if (out / RUN).exists():
        run = json.loads((out / RUN).read_text())
        if meta is None:
            meta = run.get("meta")
        else:  # the run's latest settings and elapsed time, for a later --report
            write_text(out / RUN, json.dumps({**run, "meta": meta}, indent=1, default=str))
    record = summarize(out, meta)
    made = plots(record, out) if with_plots else []
    write_text(out / SUMMARY_JSON, json.dumps(record, indent=1, default=str))
    write_text(out / SUMMARY_MD, "\n".join(markdown(record, made)) + "\n")
    return record


def render(out: Path) -> dict:
    """The ``--report DIR`` mode: summary and plots from a finished (or partial) results folder."""
    from prunekit.benchmarks.studies.full_eval import RUN
    from prunekit.errors import UserError

    if not (out / RUN).exists():
        raise UserError(f"--report: {str(out)!r} has no {RUN} (not a full_eval results folder)")
    return write_summary(out, None, with_plots=True)
