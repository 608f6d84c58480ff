"""Console tables for a run: before/after metrics and the achieved reduction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Keep the table to what a reader compares: perplexity, each task's reported metric and the mean.
HIDDEN_LEAVES = ("n_tokens", "n_windows", "n_predicted", "tokens_in_split", "nll_mean", "window", "stderr",
                 "n", "version", "limit", "seconds")
HIDDEN_BRANCHES = ("spec", "versions", "data", "all")


def flatten_numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``a.b.c -> value`` (counts and versions left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in HIDDEN_BRANCHES:
                continue
            out.update(flatten_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        if prefix.rsplit(".", 1)[-1] not in HIDDEN_LEAVES:
            out[prefix] = float(tree)
    return out


def print_metrics(columns: dict[str, Any], title: str, console: Console | None = None) -> None:
    """One row per metric, one column per named result (e.g. before / after)."""
    flat = {name: flatten_numbers(m) for name, m in columns.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for key in keys:
        table.add_row(key, *(f"{flat[n][key]:.4g}" if key in flat[n] else "-" for n in columns))
    (console or Console()).print(table)


def print_run_summary(manifest: dict[str, Any], output: Path, console: Console | None = None) -> None:
    console = console or Console()
    r = manifest["reduction"]
    console.print(
        f"[bold]{manifest['method']['name']}[/bold]: parameters {r['params_before']:,} -> {r['params_after']:,} "
        f"({100 * r['params_removed_fraction']:.2f} % removed; attention units "
        f"{100 * r.get('attention_units_removed_fraction', 0):.1f} %, MLP channels "
        f"{100 * r.get('mlp_units_removed_fraction', 0):.1f} % of pruned layers)"
    )
    if manifest.get("metrics"):
        print_metrics(manifest["metrics"], title="before / after pruning", console=console)
    loader = ("AutoModelForCausalLM.from_pretrained" if manifest["uniform_shapes"] else
              "AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) or prunekit.load_pruned")
    console.print(f"saved to {output} (load with {loader}); timings: {manifest['timings']}")
