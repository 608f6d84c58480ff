"""PNG plots of benchmark records: mask IoU vs noise, perplexity vs ratio, cost bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    """Write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def iou_vs_noise(records: list[dict], path: Path) -> Path:
    """Mean kept-unit IoU (min–max over seeds as error bars) against relative weight-noise level, per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in records:
        table = rec["aggregate"]["by_perturbation"]
        pts = sorted((row["level"], row["iou"]) for row in table.values() if row.get("level") and row["iou"])
        xs = [0.0] + [100 * lvl for lvl, _ in pts]
        ys = [1.0] + [s["mean"] for _, s in pts]
        lo = [0.0] + [s["mean"] - s["min"] for _, s in pts]
        hi = [0.0] + [s["max"] - s["mean"] for _, s in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=rec["method"])
    ax.set_xlabel("relative weight noise σ (% of |w|)")
    ax.set_ylabel("IoU of kept units vs unperturbed")
    ax.set_title(f"Mask stability under weight noise (ratio {records[0]['ratio']})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def ppl_vs_ratio(records: list[dict], path: Path) -> Path:
    """Pruned perplexity against pruning ratio per method, one panel per corpus, dense as a dashed line."""
    corpora = sorted({k[4:] for rec in records for row in rec["by_ratio"].values() for k in row
                      if k.startswith("ppl_")})
    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for rec in records:
            ratios = sorted(rec["by_ratio"], key=float)
            stats = [rec["by_ratio"][r].get(f"ppl_{corpus}") for r in ratios]
            ax.errorbar([float(r) for r in ratios], [s["mean"] for s in stats],
                        yerr=[[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]],
                        marker="o", capsize=3, label=rec["method"])
        ax.axhline(records[0]["dense"][f"ppl_{corpus}"], color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("ratio (fraction of units removed per pruned layer)")
        ax.set_ylabel(f"{corpus} perplexity")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return _save(fig, path)


def cost_bars(records: list[dict], path: Path) -> Path:
    """Estimation seconds and peak-memory delta over float32 model size, one bar per method."""
    names = [r["method"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.bar(names, [r["estimation_seconds"] for r in records], color="tab:blue")
    left.set_ylabel("importance estimation (s)")
    right.bar(names, [r["peak_delta_over_model"] for r in records], color="tab:orange")
    right.axhline(3.0, color="red", linestyle="--", label="target ≤ 3×")
    right.set_ylabel("peak RSS increase / float32 model size")
    right.legend()
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", rotation=20)
    return _save(fig, path)
