"""Console tables for a run: before/after metrics with standard errors, and the achieved reduction.

A before/after difference is marked "within noise" when |Δ| < 2·sqrt(se_before² + se_after²), so a change
the sample size cannot resolve (e.g. a zero-shot mean over 50 examples per task) is never read as a gain.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Keep the table to what a reader compares: perplexity, each task's reported metric and the mean.
HIDDEN_LEAVES = ("n_tokens", "n_windows", "n_predicted", "tokens_in_split", "nll_mean", "window", "stderr",
                 "n", "version", "limit", "seconds")
HIDDEN_BRANCHES = ("spec", "versions", "data", "all", "window_selection", "cache")
NOISE_SIGMAS = 2.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten_numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``a.b.c -> value`` (counts, versions and errors left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in HIDDEN_BRANCHES:
                continue
            out.update(flatten_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif _is_number(tree):
        leaf = prefix.rsplit(".", 1)[-1]
        if leaf not in HIDDEN_LEAVES and not leaf.endswith("_stderr"):
            out[prefix] = float(tree)
    return out


def flatten_stderr(tree: Any, prefix: str = "") -> dict[str, float]:
    """The standard error of each flattened metric: a ``stderr`` leaf belongs to its sibling ``value``, an
    ``X_stderr`` leaf to its sibling ``X`` (the conventions of prunekit's perplexity and lm-eval summaries)."""
    out: dict[str, float] = {}
    if not isinstance(tree, dict):
        return out
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and key not in HIDDEN_BRANCHES:
            out.update(flatten_stderr(value, path))
        elif _is_number(value) and (key == "stderr" or key.endswith("_stderr")):
            metric = "value" if key == "stderr" else key[: -len("_stderr")]
            out[f"{prefix}.{metric}" if prefix else metric] = float(value)
    return out


def within_noise(a: float, se_a: float | None, b: float, se_b: float | None,
                 sigmas: float = NOISE_SIGMAS) -> bool | None:
    """Whether ``b - a`` is smaller than ``sigmas`` standard errors of the difference (None: no error known)."""
    if se_a is None or se_b is None:
        return None
    return abs(b - a) < sigmas * math.sqrt(se_a ** 2 + se_b ** 2)


def _cell(value: float | None, se: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g} ± {se:.2g}" if se is not None else f"{value:.4g}"


def metrics_table(columns: dict[str, Any], title: str) -> Table:
    """One row per metric, one column per named result (value ± standard error); with exactly two results a
    Δ column that says when the difference is within noise."""
    flat = {name: flatten_numbers(m) for name, m in columns.items()}
    errors = {name: flatten_stderr(m) for name, m in columns.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    names = list(columns)
    compare = len(names) == 2
    table = Table(title=title, caption=(f"Δ marked 'within noise' when |Δ| < {NOISE_SIGMAS:g}·√(se₁² + se₂²)"
                                        if compare else None))
    table.add_column("metric", overflow="fold")  # long metric names wrap on narrow consoles, never "…"
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    if compare:
        table.add_column("Δ", justify="right", overflow="fold")
    for key in keys:
        label = key.removesuffix(".value")  # "perplexity.ptb", not "perplexity.ptb.value"
        row = [label, *(_cell(flat[n].get(key), errors[n].get(key)) for n in names)]
        if compare:
            a, b = (flat[n].get(key) for n in names)
            if a is None or b is None:
                row.append("-")
            else:
                noise = within_noise(a, errors[names[0]].get(key), b, errors[names[1]].get(key))
                row.append(f"{b - a:+.4g}" + (" [dim](within noise)[/dim]" if noise else ""))
        table.add_row(*row)
    return table


def print_metrics(columns: dict[str, Any], title: str, console: Console | None = None) -> None:
    """Print :func:`metrics_table`."""
    (console or Console()).print(metrics_table(columns, title))


def cache_note(metrics: dict[str, Any]) -> str | None:
    """One line saying the dense metrics came from prunekit's cache (None when they were computed now)."""
    cache = (metrics.get("before") or {}).get("cache") or {}
    if not cache.get("hit"):
        return None
    return (f"dense ('before') metrics reused from the cache ({cache.get('file')}); "
            f"--no-eval-cache evaluates the dense model again")


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
        note = cache_note(manifest["metrics"])
        if note:
            console.print(note)
        print_metrics(manifest["metrics"], title="before / after pruning", console=console)
    for error in (manifest.get("errors") or {}).values():
        console.print(f"[red]{error['stage']} failed[/red]: {error['type']}: {error['message']}")
    loader = ("AutoModelForCausalLM.from_pretrained" if manifest["uniform_shapes"] else
              "AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) or prunekit.load_pruned")
    console.print(f"saved to {output} (load with {loader}); timings: {manifest['timings']}")
