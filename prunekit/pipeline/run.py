"""``prunekit run`` as a thin caller of the public API: load → evaluate (before) → prune → evaluate (after) → save.

Stage timings, lifecycle hooks and run.json are the same for the CLI and :func:`prunekit.prune`, because
the pruning stages live in :mod:`prunekit.pipeline.prune`. Work is never thrown away: when the "after" evaluation
fails or is interrupted, the pruned model is saved with the error in run.json and
:class:`prunekit.errors.EvaluationFailed` is raised.
"""

from __future__ import annotations

import functools
import traceback
from pathlib import Path
from typing import Any, Callable

import prunekit.allocation.cache as allocation_cache
import prunekit.data.tokens as token_cache
from prunekit.core.config import RunConfig
from prunekit.errors import EvaluationFailed
from prunekit.eval.suite import eval_spec, evaluate_model, plugin_evaluators
from prunekit.io.export import check_output_dir, save_pruned
from prunekit.io.gguf import check_config, check_exportable, export_gguf, gguf_name
from prunekit.io.load import load_model
from prunekit.pipeline.checks import check_sources
from prunekit.pipeline.context import RunContext
from prunekit.pipeline.plan import RunPlan, plan
from prunekit.pipeline.prune import prepare, prune_with_config
from prunekit.plugin.host import PluginHost, get_host
from prunekit.plugin.registry import Registry, get_registry


def output_dir(config: RunConfig) -> Path:
    """Where a run writes: ``config.output`` or ``./pruned-METHOD``."""
    return config.output or Path(f"pruned-{config.method}")


def preflight(config: RunConfig, registry: Registry) -> RunPlan:
    """Everything that can be refused before loading a model: method, options, recovery, evaluators, output folder."""
    run_plan = plan(config, registry)
    # offline data
    check_sources(config, run_plan.method.needs_calibration(run_plan.options), run_plan.recovery_options)
    if config.evaluation.enabled:
        plugin_evaluators(config.evaluation, registry)  # an unknown evaluator fails before any work
    check_output_dir(output_dir(config), config.overwrite, config.model)
    return run_plan


def evaluate_before(ctx: RunContext, evaluate, progress: bool) -> dict[str, Any]:
    """The dense model's metrics, read from prunekit's cache when this model was evaluated alike before."""
    spec = ctx.config.evaluation
    compute = functools.partial(evaluate, ctx.model, ctx.tokenizer, spec, progress=progress)
    if not getattr(spec, "cache", True):
        return compute()
    from prunekit.eval.cache import cached_metrics

    settings = eval_spec(spec).model_dump(mode="json")
    return cached_metrics(ctx.model, ctx.tokenizer, settings, compute)  # a hit is said above the table (cache_note)


def error_record(stage: str, exc: BaseException) -> dict[str, str]:
    """A failed stage for run.json: its name, the exception type and message, and the traceback's last frames."""
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"stage": stage, "type": type(exc).__name__, "message": str(exc), "traceback": "".join(frames[-3:])}


def run(config: RunConfig, registry: Registry | None = None, host: PluginHost | None = None,
        evaluate_fn=None, progress: bool = True,
        on_stage: Callable[[str, float], None] | None = None) -> RunContext:
    """Prune one model as ``config`` says and save it with its manifest; returns the run's state. ``on_stage`` is
    told (name, seconds) as each stage completes: load, evaluate_before, groups, calibrate, score, select, prune,
    repair, recover, evaluate_after, save."""
    # a run writes files anyway: tokenized corpora and measured allocations are kept across runs
    with token_cache.on_disk(), allocation_cache.on_disk():
        return _run(config, registry, host, evaluate_fn, progress, on_stage)


def _run(config: RunConfig, registry: Registry | None, host: PluginHost | None, evaluate_fn,
         progress: bool, on_stage: Callable[[str, float], None] | None = None) -> RunContext:
    host = host or get_host()
    registry = registry or get_registry(host)
    run_plan = preflight(config, registry)
    evaluate = evaluate_fn or functools.partial(evaluate_model, registry=registry)

    ctx = RunContext(config=config, registry=registry, on_stage=on_stage)
    with ctx.stage("load"):
        ctx.model, ctx.tokenizer, source = load_model(config.model, config.dtype, config.device,
                                                      device_map=config.device_map, max_memory=config.max_memory,
                                                      offload_folder=config.offload_folder)
    ctx.adapter = registry.adapter_for(ctx.model)
    # layers, context length, offload limits, tokenizer: refused before the 'before' evaluation, checked once
    prepared = prepare(ctx.model, ctx.tokenizer, config, registry, run_plan=run_plan)
    if config.export.gguf:
        check_config(ctx.model.config)  # an architecture llama.cpp cannot take is refused before any work
    metrics: dict[str, Any] = {}
    if config.evaluation.enabled:
        with ctx.stage("evaluate_before"):
            metrics["before"] = evaluate_before(ctx, evaluate, progress)

    result = prune_with_config(ctx.model, ctx.tokenizer, config, registry=registry, host=host, context=ctx,
                               source=source, prepared=prepared)
    failure: BaseException | None = None
    if config.evaluation.enabled:
        try:
            with ctx.stage("evaluate_after"):
                metrics["after"] = evaluate(ctx.model, ctx.tokenizer, config.evaluation, progress=progress)
        except (Exception, KeyboardInterrupt) as exc:  # the pruned model is saved whatever the evaluation did
            failure = exc
            result.errors["evaluate_after"] = error_record("evaluate_after", exc)

    result.metrics = metrics
    ctx.manifest = result.manifest()
    extras = None
    if config.export.gguf:
        check_exportable(ctx.model, config.export.gguf)  # refused before anything is written

        def extras(folder):
            export_gguf(ctx.model, ctx.tokenizer, folder / gguf_name(config.export.gguf), type=config.export.gguf)
    with ctx.stage("save"):  # run.json's timings cover every stage before it
        save_pruned(ctx.model, ctx.tokenizer, output_dir(config), ctx.manifest, extras=extras)
    if failure is not None:
        raise EvaluationFailed(output_dir(config), ctx.manifest, failure) from failure
    return ctx
