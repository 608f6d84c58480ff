"""Tables and the plot of the allocators-at-every-budget section of docs/benchmarks.md (issue 14): perplexity
per allocation and parameter budget (per seed, mean, x uniform) and pruned/dense throughput per allocation.

``python -m prunekit.benchmarks.studies.allocation_budgets --rows ROWS.jsonl [--cost COST.json...] [--plot PNG]`` prints
the markdown; ``--collect DIR...`` first gathers the ``allocation-test-*.json`` records of allocation_study
runs into ROWS.jsonl (one line per pruned model, plus one ``dense`` line per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from prunekit.benchmarks.report import table

CORPORA = (("ptb", "PTB"), ("wikitext2", "WikiText-2"))
#: display names of the study's labels (measured+search is what a default run's measured allocator does)
NAMES = {"uniform": "uniform (LLM-Pruner)", "uniform-mlp": "uniform-mlp", "measured+search": "measured (default)",
         "global": "global"}


def collect(folders: list[Path]) -> list[dict]:
    """Rows of every ``allocation-test-*.json`` under ``folders``, with one ``dense`` row per record."""
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).glob("allocation-test-*.json")):
            record = json.loads(path.read_text())
            rows.append({"allocation": "dense", "method": record["method"], "n_windows": record["n_windows"],
                         "split": record["split"], "params": record["dense"]["params"],
                         "ppl": {c: record["dense"][f"ppl_{c}"] for c, _ in CORPORA if f"ppl_{c}" in record["dense"]}})
            rows += [{"method": record["method"], "n_windows": record["n_windows"], "split": record["split"], **r}
                     for r in record["rows"]]
    return rows


def quality_table(rows: list[dict]) -> list[str]:
    """Markdown: one line per (budget, allocation): removed, per-seed and mean perplexity, x uniform."""
    pruned = [r for r in rows if r["allocation"] != "dense"]
    budgets = sorted({r["budget"] for r in pruned})
    labels = list(dict.fromkeys(r["allocation"] for r in pruned))
    out = []
    for budget in budgets:
        at = [r for r in pruned if r["budget"] == budget]
        base = {c: mean_ppl([r for r in at if r["allocation"] == "uniform"], c) for c, _ in CORPORA}
        for label in labels:
            mine = sorted((r for r in at if r["allocation"] == label), key=lambda r: r["seed"])
            if not mine:
                continue
            cells = [NAMES.get(label, label), f"{100 * budget:.1f} %",
                     f"{100 * statistics.fmean(r['params_removed_fraction'] for r in mine):.2f} %"]
            for corpus, _ in CORPORA:
                m = mean_ppl(mine, corpus)
                cells += [" / ".join(f"{r['ppl'][corpus]:.1f}" for r in mine), f"**{m:.1f}**",
                          f"{m / base[corpus]:.3f}" if base[corpus] else "—"]
            out.append(cells)
    return table(["allocation", "budget", "removed", "PTB per seed", "PTB mean", "× uniform", "WikiText-2 per seed",
                  "WikiText-2 mean", "× uniform"], out)


def mean_ppl(rows: list[dict], corpus: str) -> float | None:
    """Mean perplexity over seeds (None when there are no rows)."""
    return statistics.fmean(r["ppl"][corpus] for r in rows) if rows else None


def cost_table(records: list[dict]) -> list[str]:
    """Markdown: pruned/dense prefill and decode throughput of each allocation; with several records (repeat
    runs), the median and the min–max over them."""
    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"

    rows = []
    for first in records[0]["rows"]:
        same = [r for rec in records for r in rec["rows"]
                if (r["allocation"], r["budget"]) == (first["allocation"], first["budget"])]
        rows.append([NAMES.get(first["allocation"], first["allocation"]), f"{100 * first['budget']:.1f} %",
                     f"{100 * first['params_removed_fraction']:.2f} %", cell([r["prefill_speedup"] for r in same]),
                     cell([r["decode_speedup"] for r in same])])
    return table(["allocation", "budget", "removed", "prefill × dense", "decode × dense"], rows)


def plot(rows: list[dict], path: Path) -> Path:
    """Mean perplexity against the fraction of parameters removed, one line per allocation, PTB and WikiText-2."""
    from prunekit.benchmarks.plots import _save, plt

    dense = [r for r in rows if r["allocation"] == "dense"]
    pruned = [r for r in rows if r["allocation"] != "dense"]
    fig, axes = plt.subplots(1, len(CORPORA), figsize=(11, 4.2), squeeze=False)
    for ax, (corpus, title) in zip(axes[0], CORPORA):
        d = statistics.fmean(r["ppl"][corpus] for r in dense)
        for label in dict.fromkeys(r["allocation"] for r in pruned):
            pts = []
            for budget in sorted({r["budget"] for r in pruned if r["allocation"] == label}):
                at = [r for r in pruned if r["allocation"] == label and r["budget"] == budget]
                pts.append((100 * statistics.fmean(r["params_removed_fraction"] for r in at), mean_ppl(at, corpus)))
            ax.plot([0] + [x for x, _ in pts], [d] + [y for _, y in pts], marker="o", label=NAMES.get(label, label))
        ax.set_title(f"{title} test, {pruned[0]['n_windows']} spaced 128-token windows")
        ax.set_xlabel("parameters removed (%)")
        ax.set_ylabel("perplexity (mean over seeds)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return _save(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=Path, required=True, help="JSONL of rows (written first when --collect is given)")
    ap.add_argument("--collect", type=Path, nargs="*", default=None, help="allocation_study output folders")
    ap.add_argument("--cost", type=Path, nargs="*", default=None,
                    help="allocation-cost-METHOD.json records (repeat runs: median and range)")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.collect:
        args.rows.write_text("".join(json.dumps(r, default=str) + "\n" for r in collect(args.collect)))
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    lines = quality_table(rows)
    if args.cost:
        lines += ["", *cost_table([json.loads(p.read_text()) for p in args.cost])]
    if args.plot:
        plot(rows, args.plot)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
