"""Console tables for a run: before/after metrics with standard errors, and the achieved reduction.

A before/after difference is marked "(noise)" when |Δ| < 2·sqrt(se_before² + se_after²), so a change
the sample size cannot resolve (a perplexity over 40 windows, a zero-shot task over a sample of its examples,
their mean) is never read as a gain. Rows carry short labels ("ptb ppl", "BoolQ acc") so the table fits 80
columns, and a quick evaluation says so under the table, with the command that gives the full one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from prunekit.core.evaluation import QUICK_ZERO_SHOT_EXAMPLES

# Keep the table to what a reader compares: perplexity, each task's reported metric and the mean.
HIDDEN_LEAVES = ("n_tokens", "n_windows", "n_predicted", "tokens_in_split", "nll_mean", "window", "stderr",
                 "n", "version", "limit", "seconds")
HIDDEN_BRANCHES = ("spec", "versions", "data", "all", "window_selection", "sample", "cache", "evaluator_options",
                   "third_party_log")
# How the table names a zero-shot task (the names the papers' tables use).
TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
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


def short_label(key: str, metrics: Any = None) -> str:
    """The row label of a flattened metric: "ptb ppl", "BoolQ acc", "zero-shot mean", a plugin evaluator's
    "NAME.FIELD"; anything else its key (without a trailing ".value")."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "perplexity":
        return f"{parts[1]} {parts[2]}"
    if len(parts) == 4 and parts[:2] == ["zero_shot", "tasks"] and parts[3] == "value":
        task = parts[2]
        metric = (((metrics or {}).get("zero_shot") or {}).get("tasks", {}).get(task) or {}).get("metric")
        return f"{TASK_LABELS.get(task, task)} {metric}" if metric else TASK_LABELS.get(task, task)
    if key == "zero_shot.mean":
        return "zero-shot mean"
    if len(parts) >= 2 and parts[0] == "evaluators":
        return ".".join(parts[1:])
    return key.removesuffix(".value")


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
    table = Table(title=title, caption=(f"(noise): |Δ| < {NOISE_SIGMAS:g}·√(se₁² + se₂²), within the sampling noise"
                                        if compare else None))
    table.add_column("metric", overflow="fold")  # long metric names wrap on narrow consoles, never "…"
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    if compare:
        table.add_column("Δ", justify="right", overflow="fold")
    for key in keys:
        label = short_label(key, next(iter(columns.values())) if columns else {})
        row = [label, *(_cell(flat[n].get(key), errors[n].get(key)) for n in names)]
        if compare:
            a, b = (flat[n].get(key) for n in names)
            if a is None or b is None:
                row.append("-")
            else:
                noise = within_noise(a, errors[names[0]].get(key), b, errors[names[1]].get(key))
                row.append(f"{b - a:+.3g}" + (" [dim](noise)[/dim]" if noise else ""))
        table.add_row(*row)
    return table


def print_metrics(columns: dict[str, Any], title: str, console: Console | None = None,
                  model_hint: str | None = None) -> None:
    """Print :func:`metrics_table`, and under it what a quick evaluation measured (:func:`quick_note`)."""
    console = console or Console()
    console.print(metrics_table(columns, title))
    spec = next((m.get("spec") for m in columns.values() if isinstance(m, dict) and m.get("spec")), None)
    note = quick_note(spec, model_hint)
    if note:
        console.print(note, soft_wrap=True, highlight=False)


def quick_note(spec: dict[str, Any] | None, model_hint: str | None = None) -> str | None:
    """What a quick evaluation measured, in words, and the command for the full one (None for a full one).
    ``model_hint`` is the ``--model`` of that command (None: the embedded model, no flag)."""
    if not spec:
        return None
    windows, limit, tasks = spec.get("ppl_max_windows"), spec.get("zero_shot_limit"), spec.get("zero_shot") or []
    model = f" --model {model_hint}" if model_hint else ""
    corpora = spec.get("perplexity") or []
    if (windows is None or not corpora) and (limit is None or not tasks) and (corpora or tasks):
        return None  # every window and example: not an estimate of anything larger
    parts = []
    if corpora:
        parts.append(f"perplexity on {windows} evenly spaced {spec.get('ppl_window')}-token windows per corpus"
                     if windows is not None else "perplexity on the full test sets")
    if tasks:
        parts.append(f"zero-shot accuracy on {limit} evenly spaced examples per task" if limit is not None
                     else "zero-shot accuracy on the full sets")
    else:
        parts.append("zero-shot accuracy not measured (minutes per model on CPU for a fair sample, so not part of "
                     f"a run's quick evaluation; prunekit eval{model} gives it on {QUICK_ZERO_SHOT_EXAMPLES} examples "
                     f"per task)")
    return (f"Quick estimate: {'; '.join(parts)}. The full evaluation (every window and example; hours on CPU): "
            f"prunekit eval{model} --full")


def cache_note(metrics: dict[str, Any]) -> str | None:
    """One line saying the dense metrics came from prunekit's cache (None when they were computed now)."""
    cache = (metrics.get("before") or {}).get("cache") or {}
    if not cache.get("hit"):
        return None
    return (f"dense ('before') metrics reused from the cache ({cache.get('file')}); "
            f"--no-eval-cache evaluates the dense model again")


def print_run_summary(manifest: dict[str, Any], output: Path, console: Console | None = None) -> None:
    """The reduction, the before/after table with its notes, any failed stage, and where the model went. Lines
    other than the table are never wrapped (a log keeps one line per statement)."""
    console = console or Console()
    r = manifest["reduction"]
    console.print(
        f"[bold]{manifest['method']['name']}[/bold]: parameters {r['params_before']:,} -> {r['params_after']:,} "
        f"({100 * r['params_removed_fraction']:.2f} % removed; attention units "
        f"{100 * r.get('attention_units_removed_fraction', 0):.1f} %, MLP channels "
        f"{100 * r.get('mlp_units_removed_fraction', 0):.1f} % of pruned layers)", soft_wrap=True)
    if manifest.get("metrics"):
        note = cache_note(manifest["metrics"])
        if note:
            console.print(note, soft_wrap=True, highlight=False)
        print_metrics(manifest["metrics"], title="before / after pruning", console=console, model_hint=str(output))
    for error in (manifest.get("errors") or {}).values():
        console.print(f"[red]{error['stage']} failed[/red]: {error['type']}: {error['message']}", soft_wrap=True)
    loader = ("AutoModelForCausalLM.from_pretrained" if manifest["uniform_shapes"] else
              "AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) or prunekit.load_pruned")
    console.print(f"saved to {output} (load with {loader})", soft_wrap=True, highlight=False)
