"""One run as a straight line: load, group, evaluate, calibrate, score, select, prune, recover, evaluate, export."""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from prunekit.adapters.base import Adapter
from prunekit.allocate import allocate_select, allocator_plan, pruned_layers
from prunekit.config import RunConfig
from prunekit.errors import UserError
from prunekit.evaluate import evaluate_model, plugin_evaluators
from prunekit.export import check_output_dir, load_pruned, save_pruned
from prunekit.grouping import apply_plan
from prunekit.groups import PruningGroup
from prunekit.importance import ScoringContext
from prunekit.plugins import PluginHost, get_host
from prunekit.registry import Registry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VERSIONED = ("prunekit", "torch", "transformers", "torch-pruning", "peft", "lm-eval", "datasets", "pluggy", "pydantic")


@dataclass
class RunContext:
    """The state of one run, handed to lifecycle hooks."""

    config: RunConfig
    registry: Registry
    model: Any = None
    tokenizer: Any = None
    adapter: Adapter | None = None
    groups: list[PruningGroup] = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage into ``timings`` (seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)


def default_layers(n_layers: int) -> range:
    """LLM-Pruner's default (keep 4 first and 2 last of 32 layers), scaled to the model's depth."""
    first, last = round(4 * n_layers / 32), round(2 * n_layers / 32)
    return range(first, n_layers - last)


def resolve_layers(n_layers: int, requested: tuple[int, int] | None) -> range:
    if requested is None:
        return default_layers(n_layers)
    start, end = requested
    if end > n_layers:
        raise UserError(f"selection.layers: [{start}, {end}) is outside the model's {n_layers} layers "
                        f"(accepted: 0 <= start < end <= {n_layers})")
    return range(start, end)


def load_model(source: str | None, dtype: str, device: str):
    """Model and tokenizer from a local path, a hub id or (``None``) the embedded default model."""
    from transformers import AutoTokenizer

    if source is None:
        from prunekit.assets import default_model_dir

        source = str(default_model_dir())
    try:
        model = load_pruned(source, dtype=DTYPES[dtype], device=device)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        hint = " (offline: pass a local directory)" if not Path(source).exists() else ""
        raise UserError(f"model: cannot load {source!r}: {str(exc).splitlines()[0]}{hint}") from None
    return model.eval(), tokenizer, source


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def score_groups(ctx: RunContext, method_entry, options, batches: list[torch.Tensor],
                 compute_dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], dict]:
    """Unit scores estimated in ``compute_dtype``: float32 whatever the load dtype in a run (that cast is
    lossless and undone afterwards); benchmarks pass a lower precision to measure what it changes."""
    model, dtype = ctx.model, next(ctx.model.parameters()).dtype
    model.to(compute_dtype)
    try:
        scoring = ScoringContext(model=model, groups=ctx.groups, batches=batches, seed=ctx.config.seed)
        scores = [s.detach().float().cpu() for s in method_entry.cls(options).scores(scoring)]
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        model.to(dtype)
    if len(scores) != len(ctx.groups) or any(s.numel() != g.n_units for s, g in zip(scores, ctx.groups)):
        raise RuntimeError(f"method {method_entry.name!r} returned scores that do not match the groups")
    return scores, scoring.info


def mask_report(groups: list[PruningGroup], kept: list[torch.Tensor]) -> dict[str, dict]:
    """The kept units of every pruned group (the mask written to run.json)."""
    return {g.name: {"layer": g.layer, "unit": g.unit, "n_units": g.n_units, "kept": k.tolist()}
            for g, k in zip(groups, kept)}


def reduction_report(groups: list[PruningGroup], kept: list[torch.Tensor], before: int, after: int) -> dict:
    """Achieved reduction: of all parameters, and of attention units and MLP channels in pruned layers."""
    out: dict[str, Any] = {"params_before": before, "params_after": after,
                           "params_removed_fraction": round(1 - after / before, 6)}
    for kind in ("attention", "mlp"):
        total = sum(g.n_units for g in groups if g.kind == kind)
        if total:
            removed = sum(g.n_units - len(k) for g, k in zip(groups, kept) if g.kind == kind)
            out[f"{kind}_units_removed_fraction"] = round(removed / total, 6)
    return out


def run(config: RunConfig, registry: Registry | None = None, host: PluginHost | None = None,
        evaluate_fn=None, progress: bool = True) -> RunContext:
    """Prune one model as ``config`` says and save it with its manifest; returns the run's state."""
    host = host or get_host()
    registry = registry or Registry.from_host(host)
    entry = registry.method(config.method)
    options = entry.options(config.method_options)
    recovery = None if config.recovery.method == "none" else registry.named("recovery", config.recovery.method)
    recovery_options = (validate_recovery(recovery, config.recovery.options) if recovery else None)
    if config.evaluation.enabled:
        plugin_evaluators(config.evaluation, registry)  # an unknown evaluator fails before any work
    allocator_plan(config, registry)  # so does an unknown allocator or a bad allocator option
    output = config.output or Path(f"pruned-{config.method}")
    check_output_dir(output, config.overwrite, config.model)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda requested but no CUDA device is available (accepted: cpu, cuda)")

    ctx = RunContext(config=config, registry=registry)
    with ctx.stage("load"):
        ctx.model, ctx.tokenizer, source = load_model(config.model, config.dtype, config.device)
    ctx.adapter = registry.adapter_for(ctx.model)
    layers = pruned_layers(config, ctx.adapter.num_layers)
    with ctx.stage("groups"):
        ctx.groups = registry.named("groupers", "blocks").impl(ctx.model, ctx.adapter, layers, config.grouper)
    params_before = ctx.model.num_parameters()
    metrics: dict[str, Any] = {}
    evaluate = evaluate_fn or functools.partial(evaluate_model, registry=registry)
    if config.evaluation.enabled:
        with ctx.stage("evaluate_before"):
            metrics["before"] = evaluate(ctx.model, ctx.tokenizer, config.evaluation, progress=progress)

    batches, calibration = [], None
    if entry.cls.needs_calibration:
        with ctx.stage("calibrate"):
            batches, calibration = calibration_batches(ctx.tokenizer, config)
    with ctx.stage("score"):
        scores, method_info = score_groups(ctx, entry, options, batches)
    host.pm.hook.prunekit_after_scoring(context=ctx, scores=scores)
    with ctx.stage("select"):
        ctx.kept, allocation = allocate_select(ctx, scores)
    with ctx.stage("prune"):
        apply_plan(ctx.model, ctx.adapter, ctx.groups, ctx.kept)
        shapes = ctx.adapter.sync_config()
    host.pm.hook.prunekit_after_pruning(context=ctx, model=ctx.model)

    recovery_info = None
    if recovery is not None:
        with ctx.stage("recover"):
            recovery_info = recovery.impl(recovery_options).recover(ctx.model, ctx.tokenizer, config)
    if config.evaluation.enabled:
        with ctx.stage("evaluate_after"):
            metrics["after"] = evaluate(ctx.model, ctx.tokenizer, config.evaluation, progress=progress)

    ctx.manifest = {
        "config": config.model_dump(mode="json"),
        "model_source": source,
        "method": {"name": entry.name, "provider": entry.provider, "options": options.model_dump(mode="json"),
                   "info": method_info},
        "versions": package_versions(),
        "seed": config.seed,
        "calibration": calibration,
        "layers_pruned": [layers.start, layers.stop],
        "allocation": allocation,
        "recovery": {"method": config.recovery.method, "info": recovery_info},
        "reduction": reduction_report(ctx.groups, ctx.kept, params_before, ctx.model.num_parameters()),
        "layer_shapes": [s.as_dict() for s in shapes],
        "uniform_shapes": not getattr(ctx.model.config, "prunekit_layer_shapes", None),
        "mask": mask_report(ctx.groups, ctx.kept),
        "metrics": metrics,
        "timings": dict(ctx.timings),
    }
    save_pruned(ctx.model, ctx.tokenizer, output, ctx.manifest)  # timings cover every stage before export
    return ctx


def validate_recovery(entry, values: dict):
    from prunekit.registry import validate_options

    return validate_options(entry.impl.Options, values, "recovery.options.")


def calibration_batches(tokenizer, config: RunConfig) -> tuple[list[torch.Tensor], dict]:
    """Seeded calibration windows, split into batches of ``calibration.batch_size``."""
    from prunekit.data import calibration_batches as sample

    c = config.calibration
    ids, info = sample(tokenizer, source=c.source, n_samples=c.n_samples, seq_len=c.seq_len, seed=c.seed)
    return list(ids.split(c.batch_size)), info
