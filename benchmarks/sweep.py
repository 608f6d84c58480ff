"""Sweep suite: quality per unit of compute for taylor, fisher, moreau and moreau-gs.

Every grid point (method, options, calibration size) is scored on 3 calibration seeds; each point
records the scoring wall time, the pruned model's perplexity on evenly spaced PTB *validation* windows
(mean and spread over seeds) and the mean pairwise IoU of the removed units across seeds. Settings are
chosen on PTB validation only: per method, the lowest mean validation perplexity at a cost of at most
``max_cost`` default taylor passes (the taylor point with the run's default calibration is the unit).
Every point's masks are also evaluated on PTB test and WikiText-2 test (evenly spaced windows) as it
goes, so a sweep stopped early still has comparable figures; the choice never looks at them.

The issue's setting: ratio 0.25 of the MLP channels of the pipeline's default layers (4–27 on
SmolLM2-135M), attention left whole, local selection.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit import api
from prunekit.adapters.grouping import GrouperOptions
from prunekit.benchmarks.metrics import iou, summary
from prunekit.benchmarks.workbench import Workbench
from prunekit.builtin.moreau import PAPER, PRESETS
from prunekit.core.config import CalibrationConfig
from prunekit.data.sampling import CalibrationSampler
from prunekit.data.sources import calibration_batches, load_text, token_ids
from prunekit.eval.perplexity import window_nll

log = logging.getLogger("benchmarks")
SEQ_LEN = CalibrationConfig().seq_len
DEFAULT_SAMPLES = CalibrationConfig().n_samples
MLP_ONLY = GrouperOptions(prune_attention=False)


@dataclass(frozen=True)
class Point:
    """One grid point: a method preset, its options and the calibration size (sequences of 64 tokens)."""

    method: str
    options: dict = field(default_factory=dict)
    samples: int = DEFAULT_SAMPLES
    label: str = ""

    def name(self) -> str:
        """A short unique label for tables."""
        return self.label or f"{self.method} n={self.samples}"

    def passes(self) -> float:
        """Calibration sequences back-propagated, in units of the default taylor's (10 sequences of 64 tokens).

        The cost measure the choice uses: wall time on a shared machine moves with other people's load
        (the same taylor pass measured 36–65 s in one sweep), this count does not. Per-sequence passes
        (fisher) are somewhat slower per token than taylor's micro-batches; wall time is recorded too.
        """
        o = {**PRESETS.get(self.method, {}), **self.options}  # the registered preset's iterations and salience
        if self.method.startswith("moreau"):
            steps = o.get("iterations", 10) * o.get("noise_samples", 1)
            extra = 1 if o.get("salience") == "fisher" else 0
            return (steps + extra) * self.samples / DEFAULT_SAMPLES
        return self.samples / DEFAULT_SAMPLES


# ρ·‖∇L‖ = 1e-4·‖w‖: on SmolLM2 ρ ≈ 0.06 and the proximal point lowers the calibration loss by ≈ 0.23
# nats in 4 steps (docs/moreau.md); 2e-2 diverged (loss 4.9 -> 8.8).
RELATIVE = {"rho_relative": 1e-4, "step_fraction": 0.5}
# moreau-gs's defaults before this sweep (the paper's; registered as moreau-gs-paper), spelled out so the points
# keep their meaning under today's moreau-gs preset (a user-set rho/step replaces its relative counterparts)
PAPER_GS = {**PAPER, "resample": False, "salience": "gradient"}
# Ordered cheap first and kept small: on the shared 2-core CPU one moreau step costs ~1 taylor pass.
GRID: tuple[Point, ...] = (
    Point("taylor", {}, 10, "taylor 10x64 (default)"),
    Point("fisher", {}, 10, "fisher 10x64"),
    Point("moreau-gs", {"resample": True, "iterations": 5, "averaged": 2, "salience": "gradient", **RELATIVE}, 10,
          "moreau-gs T=5 resample rho_rel=1e-4 c=0.5"),
    Point("fisher", {}, 40, "fisher 40x64"),
    Point("moreau-gs", PAPER_GS, 10, "moreau-gs reference settings (T=10)"),
    Point("moreau", {"resample": True, "iterations": 5, "averaged": 2, **RELATIVE}, 10,
          "moreau T=5 resample rho_rel=1e-4 c=0.5"),
    Point("taylor", {}, 100, "taylor 100x64"),
)

# Follow-up to GRID on the same axes and windows: the second-order salience at the smoothed point.
SMOOTHED: tuple[Point, ...] = (
    Point("moreau-gs", {"resample": True, "iterations": 5, "averaged": 2, "salience": "fisher", **RELATIVE}, 10,
          "moreau-gs T=5 resample rho_rel=1e-4 c=0.5 salience=fisher"),
)
GRIDS: dict[str, tuple[Point, ...]] = {"main": GRID, "smoothed": SMOOTHED}


def evenly_spaced(tokenizer, corpus: str, split: str, n: int, window: int = 128) -> torch.Tensor:
    """``n`` evenly spaced non-overlapping windows of the split (all windows when n is None or larger)."""
    ids = token_ids(tokenizer, load_text(corpus, split))
    total = ids.numel() // window
    windows = ids[: total * window].view(total, window)
    if n is None or n >= total:
        return windows
    return windows[torch.linspace(0, total - 1, n).round().long()]


@torch.no_grad()
def ppl(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """Perplexity of ``model`` over the given token windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        nll, n = window_nll(model, windows[i:i + batch])
        total, count = total + nll, count + n
    return float(torch.tensor(total / count).exp())


def removed(groups, kept) -> set[tuple[str, int]]:
    """Removed (group, unit) pairs."""
    return {(g.name, u) for g, k in zip(groups, kept) for u in set(range(g.n_units)) - set(k.tolist())}


def mean_pairwise_iou(sets: list[set]) -> float | None:
    """Mean IoU over all pairs of sets (None for fewer than two)."""
    pairs = list(itertools.combinations(sets, 2))
    return statistics.fmean(iou(a, b) for a, b in pairs) if pairs else None


def score_point(wb: Workbench, groups, point: Point, seed: int) -> tuple[list[torch.Tensor], dict, float]:
    """Score the dense model for one point and seed through the pipeline's scorer (with a calibration sampler)."""
    entry = wb.method(point.method)
    options = entry.options(point.options)
    ids, _ = calibration_batches(wb.tokenizer, "ptb", point.samples, SEQ_LEN, seed)
    batches = list(ids.split(wb.profile.calib_batch))
    sampler = CalibrationSampler(wb.tokenizer, "ptb", point.samples, SEQ_LEN, wb.profile.calib_batch, seed)
    started = time.perf_counter()
    scores, info = api.score(wb.model, groups, entry.name, batches, options=options, seed=seed,
                             registry=wb.registry, sampler=sampler)
    return scores, info, time.perf_counter() - started


def _brief(info: dict) -> dict:
    """The method info without per-window offsets."""
    out = dict(info)
    for draw in out.get("calibration_draws", []):
        draw.pop("starts", None)
    return out


EVAL = ("ptb_validation", "ptb_test", "wikitext2_test")


def run(wb: Workbench, methods: list[str], seeds: list[int], ratio: float = 0.25, val_windows: int = 40,
        test_windows: int = 150, max_cost: float = 10.0, out: Path | None = None,
        grid: tuple[Point, ...] = GRID) -> dict:
    """The sweep record: every point on PTB validation and both test sets; the choice from validation only."""
    started = time.perf_counter()
    groups = wb.groups(wb.model, MLP_ONLY)
    windows = {"ptb_validation": evenly_spaced(wb.tokenizer, "ptb", "validation", val_windows),
               "ptb_test": evenly_spaced(wb.tokenizer, "ptb", "test", test_windows),
               "wikitext2_test": evenly_spaced(wb.tokenizer, "wikitext2", "test", test_windows)}
    record: dict[str, Any] = {"suite": "sweep", "ratio": ratio, "seeds": seeds,
                              "layers": [wb.layers.start, wb.layers.stop],
                              "blocks": "mlp", "windows": {k: len(v) for k, v in windows.items()}, "window": 128,
                              "max_cost_taylor_passes": max_cost, "points": [], "loadavg_start": os.getloadavg(),
                              "torch_threads": torch.get_num_threads(),
                              "dense": {k: ppl(wb.model, w) for k, w in windows.items()}}
    for point in (p for p in grid if p.method in methods):
        rows, masks = [], []
        for seed in seeds:
            scores, info, seconds = score_point(wb, groups, point, seed)
            kept = wb.keep(groups, scores, ratio)
            model = wb.pruned(wb.model, groups, kept)
            row = {"seed": seed, "score_seconds": seconds, "loadavg": os.getloadavg()[0], "info": _brief(info),
                   **{f"ppl_{k}": ppl(model, w) for k, w in windows.items()}}
            rows.append(row)
            masks.append(kept)
            log.info("sweep %s seed %d: %.1fs, ppl %s", point.name(), seed, seconds,
                     {k: round(row[f"ppl_{k}"], 2) for k in windows})
        record["points"].append({"point": asdict(point), "name": point.name(), "rows": rows,
                                 "score_seconds": summary([r["score_seconds"] for r in rows]),
                                 **{f"ppl_{k}": summary([r[f"ppl_{k}"] for r in rows]) for k in windows},
                                 "removed_iou": mean_pairwise_iou([removed(groups, k) for k in masks])})
        record["chosen"] = choose(record["points"], max_cost)
        _checkpoint(out, record)
    record["loadavg_end"] = os.getloadavg()
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def choose(points: list[dict], max_cost: float) -> dict[str, str]:
    """Per method, the point with the lowest mean PTB-validation perplexity within ``max_cost`` taylor passes
    (:meth:`Point.passes`); also records each point's wall time over the default taylor's."""
    unit = next((p["score_seconds"]["mean"] for p in points if p["name"] == GRID[0].name()), None)
    chosen: dict[str, str] = {}
    for p in points:
        p["cost_taylor_passes"] = Point(**p["point"]).passes()
        p["time_over_taylor"] = p["score_seconds"]["mean"] / unit if unit else None
    for method in dict.fromkeys(p["point"]["method"] for p in points):
        fits = [p for p in points if p["point"]["method"] == method and p["cost_taylor_passes"] <= max_cost]
        if fits:
            chosen[method] = min(fits, key=lambda p: p["ppl_ptb_validation"]["mean"])["name"]
    return chosen


def _checkpoint(out: Path | None, record: dict) -> None:
    """Write the partial record so a long sweep that stops early still leaves its results."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".sweep.partial.json").write_text(json.dumps(record, indent=2, default=str))


# -- report ---------------------------------------------------------------------------------------------


def _pm(stat: dict | None, digits: int = 1) -> str:
    """'mean (min–max)' of a summary, or '—'."""
    if not stat:
        return "—"
    return f"{stat['mean']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def pareto_plots(record: dict, out: Path) -> list[Path]:
    """Perplexity vs cost and removed-set IoU vs cost, one marker series per method (PNG files in ``out``)."""
    import matplotlib.pyplot as plt

    from prunekit.benchmarks import plots  # sets the Agg backend

    points = [p for p in record["points"] if p.get("cost_taylor_passes")]
    paths = []
    for key, ylabel, name in (("ppl_ptb_validation", "PTB validation perplexity (mean, min–max over seeds)",
                               "sweep_ppl_vs_cost.png"),
                              ("removed_iou", "removed-unit IoU across calibration seeds", "sweep_iou_vs_cost.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for method in dict.fromkeys(p["point"]["method"] for p in points):
            mine = sorted((p for p in points if p["point"]["method"] == method), key=lambda p: p["cost_taylor_passes"])
            xs = [p["cost_taylor_passes"] for p in mine]
            if key == "removed_iou":
                ax.plot(xs, [p[key] for p in mine], marker="o", label=method)
            else:
                ys = [p[key]["mean"] for p in mine]
                err = [[p[key]["mean"] - p[key]["min"] for p in mine], [p[key]["max"] - p[key]["mean"] for p in mine]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
        if key != "removed_iou":
            ax.axhline(record["dense"]["ptb_validation"], color="gray", linestyle="--", label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("scoring cost (default taylor passes: sequences back-propagated / 10)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        grid = record.get("grid", "main")
        paths.append(plots._save(fig, out / (name if grid == "main" else name.replace("sweep_", f"sweep-{grid}_"))))
    return paths


def report_lines(records: list[dict], out: Path) -> list[str]:
    """The sweep section of report.md: every point, the validation choice, and the plots."""
    lines = ["## Sweep: quality per unit of compute", ""]
    for record in records:
        if "points" not in record:
            continue
        w = record["windows"]
        lines += [f"Grid `{record.get('grid', 'main')}`. Ratio {record['ratio']} of MLP channels, "
                  f"layers {record['layers'][0]}–{record['layers'][1] - 1}; "
                  f"seeds {record['seeds']}; evenly spaced 128-token windows: PTB validation {w['ptb_validation']}, "
                  f"PTB test {w['ptb_test']}, WikiText-2 test {w['wikitext2_test']}; torch threads "
                  f"{record.get('torch_threads')}, load average {record.get('loadavg_start')} → "
                  f"{record.get('loadavg_end')}. "
                  "Perplexity: mean (min–max) over seeds. Cost: calibration sequences back-propagated over the "
                  "default taylor's 10; scoring seconds (and their ratio to the default taylor's) measured on the "
                  "shared machine, so they move with its load.", ""]
        d = record["dense"]
        rows = [["dense", "–", "–", "–", f"{d['ptb_validation']:.1f}", f"{d['ptb_test']:.1f}",
                 f"{d['wikitext2_test']:.1f}"]]
        chosen = set(record.get("chosen", {}).values())
        for p in record["points"]:
            name = f"**{p['name']}**" if p["name"] in chosen else p["name"]
            cost = p.get("cost_taylor_passes")
            ratio = p.get("time_over_taylor")
            rows.append([name, f"{p['score_seconds']['mean']:.1f}" + (f" ({ratio:.1f}×)" if ratio else ""),
                         f"{cost:g}" if cost else "—",
                         f"{p['removed_iou']:.3f}" if p["removed_iou"] is not None else "—",
                         _pm(p["ppl_ptb_validation"]), _pm(p.get("ppl_ptb_test")), _pm(p.get("ppl_wikitext2_test"))])
        lines += ["| point | scoring s (busy machine) | cost (taylor passes) | removed IoU | PTB val ppl "
                  "| PTB test ppl | WikiText-2 test ppl |",
                  "|---|---|---|---|---|---|---|", *("| " + " | ".join(r) + " |" for r in rows), ""]
        lines += [f"Chosen on PTB validation (bold), at most {record['max_cost_taylor_passes']:g} taylor passes "
                  "(calibration sequences back-propagated / 10): "
                  + ", ".join(f"{m}: {n}" for m, n in record.get("chosen", {}).items()), ""]
        for path in pareto_plots(record, out):
            lines += [f"![{path.stem}]({path.name})", ""]
    return lines
