"""Collect the JSON records of a results directory into a docs-ready markdown report with PNG plots.

``python -m prunekit.benchmarks.report DIR`` (or ``--suite report``) writes DIR/report.md and DIR/*.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prunekit.benchmarks import plots
from prunekit.benchmarks.cost import derived

MB = 2**20


def load(directory: Path) -> dict[str, list[dict]]:
    """Every ``*.json`` record in ``directory`` grouped by suite (files without a suite are ignored)."""
    by_suite: dict[str, list[dict]] = {}
    for path in sorted(Path(directory).glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "suite" in record:
            by_suite.setdefault(record["suite"], []).append(record)
    return by_suite


def pm(stat: dict | None, digits: int = 3) -> str:
    """'mean ± spread' of a summary (spread = max − min over seeds), or '—'."""
    if not stat:
        return "—"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['spread']:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _missing(records: list[dict]) -> list[str]:
    """Lines for records that were skipped or failed."""
    return [f"- `{r['method']}`: {'skipped — ' + r['skipped'] if 'skipped' in r else 'failed — ' + r['error']}"
            for r in records if "skipped" in r or "error" in r]


def _ok(records: list[dict]) -> list[dict]:
    """Records with results."""
    return [r for r in records if "skipped" not in r and "error" not in r]


def machine_section(any_record: dict) -> list[str]:
    """Machine, model and profile of the run."""
    m, w = any_record.get("machine", {}), any_record.get("workbench", {})
    v = m.get("versions", {})
    return ["## Setup", "",
            f"- machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores, {m.get('memory_gb')} GB RAM, "
            f"GPU: {m.get('gpu') or 'none'}; 1-min load average at start: {m.get('loadavg_1m')}",
            f"- torch {v.get('torch')}, transformers {v.get('transformers')}, torch-pruning {v.get('torch-pruning')}, "
            f"python {v.get('python')}",
            f"- model: `{w.get('model')}` ({w.get('params')} parameters, {w.get('num_layers')} layers; "
            f"layers {w.get('layers_pruned')} pruned), device {w.get('device')}",
            f"- profile: `{w.get('profile', {}).get('name')}` — {json.dumps(w.get('profile', {}))}",
            f"- command: `{any_record.get('command')}`", ""]


def robustness_section(records: list[dict], out: Path) -> list[str]:
    """Mask IoU, flipped units and perplexity under each perturbation, per method."""
    ok = _ok(records)
    lines = ["## Robustness", ""] + _missing(records)
    if not ok:
        return lines
    r0 = ok[0]
    lines += [f"Ratio {r0['ratio']}, seeds {r0['seeds']}; values are mean ± spread (max − min) over seeds. "
              f"IoU compares the kept units with the unperturbed run of the same seed; flipped = units whose "
              f"keep/remove decision changed; ppl = {r0['corpus']} perplexity of the perturbed model pruned with its "
              f"own mask.", ""]
    names = [p["name"] for p in r0["per_seed"][0]["perturbations"] if p["name"] != "unperturbed"]  # run order
    lines += ["### Overall IoU of kept units", ""]
    lines += table(["method", *names, "ppl spread across perturbations"],
                   [[r["method"], *(pm(r["aggregate"]["by_perturbation"][n]["iou"], 4) for n in names),
                     pm(r["aggregate"]["ppl_spread"], 2)] for r in ok])
    for r in ok:
        agg = r["aggregate"]["by_perturbation"]
        lines += ["", f"### `{r['method']}` (dense {r['corpus']} ppl {r['dense_ppl']:.2f})", ""]
        lines += table(["perturbation", "weights changed", "IoU", "IoU attention", "IoU MLP", "flipped units",
                        "pruned ppl", "estimation s"],
                       [[n, pm(row["weights_changed"], 0), pm(row["iou"], 4), pm(row["iou_attention"], 4),
                         pm(row["iou_mlp"], 4), pm(row["flipped"], 1), pm(row["ppl"], 2),
                         pm(row["score_seconds"], 1)] for n, row in ((n, agg[n]) for n in ["unperturbed", *names])])
        lines += [f"- `{n}` did not run: {'; '.join(sorted(set(row['errors'])))}" for n, row in agg.items()
                  if row["errors"]]
    plot = plots.iou_vs_noise(ok, out / "robustness_iou_vs_noise.png")
    return lines + ["", f"![mask IoU vs noise]({plot.name})", ""]


def cost_section(records: list[dict], out: Path) -> list[str]:
    """Estimation time, peak memory, pruned size and speed per method, plus the cross-method ratios."""
    ok = _ok(records)
    lines = ["## Cost", ""] + _missing(records)
    if not ok:
        return lines
    ratios = derived(ok)
    per_iter = ratios.get("time_over_iterations_x_taylor", {})
    r0 = ok[0]
    lines += [f"Ratio {r0['ratio']}, seed {r0['seed']}; each method estimated in its own fresh process. "
              "Peak RSS delta = peak resident memory during estimation minus the resident memory just before it. "
              "Throughput at batch 1 in one process, dense and pruned interleaved, median of repeats; speedup = "
              "pruned / dense.", ""]
    lines += table(["method", "estimation s", "iterations", "s / (iterations × taylor s)", "peak RSS Δ MiB",
                    "Δ / fp32 model", "params dense → pruned", "prefill tok/s dense → pruned (×)",
                    "decode tok/s dense → pruned (×)"],
                   [[r["method"], f"{r['estimation_seconds']:.2f}", str(r.get("iterations") or "—"),
                     f"{per_iter[r['method']]:.3f}" if r["method"] in per_iter else "—",
                     f"{r['peak_rss_delta_bytes'] / MB:.0f}", f"{r['peak_delta_over_model']:.2f}",
                     f"{r['params_dense']:,} → {r['params_pruned']:,}",
                     _speed(r, "prefill"), _speed(r, "decode")] for r in ok])
    lines += ["", "Targets: moreau-gs estimation time / (iterations × taylor time) ≤ 1.15; "
              "peak memory increase / float32 model size ≤ 3×."]
    plot = plots.cost_bars(ok, out / "cost.png")
    return lines + ["", f"![cost]({plot.name})", ""]


def _speed(r: dict, phase: str) -> str:
    """'dense → pruned (×ratio)' tokens/s for one phase."""
    t = r["throughput"]
    return (f"{t['dense'][f'{phase}_tokens_per_s']:.1f} → {t['pruned'][f'{phase}_tokens_per_s']:.1f} "
            f"(×{r['speedup'][f'{phase}_speedup']:.2f})")


def quality_section(records: list[dict], out: Path) -> list[str]:
    """Perplexity (and zero-shot mean) per method and ratio."""
    ok = _ok(records)
    lines = ["## Quality", ""] + _missing(records)
    if not ok:
        return lines
    keys = sorted({k for r in ok for row in r["by_ratio"].values() for k in row if k != "params"})
    dense = ok[0]["dense"]
    lines += [f"Seeds {ok[0]['seeds']}; mean ± spread over seeds. Dense: "
              + ", ".join(f"{k} {dense[k]:.3f}" for k in keys if k in dense) + f", {dense['params']:,} parameters.", ""]
    rows = [[r["method"], ratio, f"{row['params']:,.0f}", *(pm(row.get(k), 2) for k in keys)]
            for r in ok for ratio, row in sorted(r["by_ratio"].items(), key=lambda kv: float(kv[0]))]
    lines += table(["method", "ratio", "params", *keys], rows)
    plot = plots.ppl_vs_ratio(ok, out / "quality_ppl_vs_ratio.png")
    return lines + ["", f"![perplexity vs ratio]({plot.name})", ""]


def peer_section(records: list[dict]) -> list[str]:
    """torch-pruning's MetaPruner next to prunekit, MLP channels only."""
    lines = ["## Peer: torch-pruning MetaPruner", ""]
    for rec in records:
        lines += [f"Ratio {rec['ratio']} of MLP channels in the pruned layers, seed {rec['seed']}. "
                  + "".join(f"{n[0].upper()}{n[1:]}. " for n in rec.get("notes", [])), ""]
        corpora = sorted(rec["dense"]["ppl"])
        rows = [["dense", "—", f"{rec['dense']['params']:,}", *(f"{rec['dense']['ppl'][c]:.2f}" for c in corpora),
                 "1.00", "1.00", "—", "—"]]
        for name, row in rec["rows"].items():
            if "error" in row:
                rows.append([name, row["library"], "failed: " + row["error"], *([""] * (len(corpora) + 4))])
                continue
            rows.append([name, row["library"], f"{row['params']:,}", *(f"{row['ppl'][c]:.2f}" for c in corpora),
                         f"{row['speedup']['prefill_speedup']:.2f}", f"{row['speedup']['decode_speedup']:.2f}",
                         f"{row['seconds']:.2f}",
                         f"{row['mask_iou_vs_prunekit']:.4f}" if "mask_iou_vs_prunekit" in row else "—"])
        lines += table(["row", "library", "params", *(f"{c} ppl" for c in corpora), "prefill ×", "decode ×",
                        "estimate+prune s", "mask IoU vs prunekit"], rows) + [""]
    return lines


def build(directory: Path) -> Path:
    """Write ``directory/report.md`` (and its plots) from the JSON records there; returns the markdown path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_suite = load(directory)
    lines = ["# prunekit benchmark report", "", "Generated from the JSON records in this directory; every number "
             "below comes from them.", ""]
    first = next((r for recs in by_suite.values() for r in _ok(recs) if "machine" in r), None)
    if first:
        lines += machine_section(first)
    if "robustness" in by_suite:
        lines += robustness_section(by_suite["robustness"], directory)
    if "cost" in by_suite:
        lines += cost_section(by_suite["cost"], directory)
    if "quality" in by_suite:
        lines += quality_section(by_suite["quality"], directory)
    if "peer" in by_suite:
        lines += peer_section(by_suite["peer"])
    if "sweep" in by_suite:
        from prunekit.benchmarks.sweep import report_lines

        lines += report_lines(by_suite["sweep"], directory)
    if "allocation" in by_suite:
        from prunekit.benchmarks.quality import allocation_section

        lines += allocation_section(by_suite["allocation"], directory)
    if not by_suite:
        lines += ["No benchmark records found."]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results")))
