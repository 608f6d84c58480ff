"""The straight line of one run on a model in memory: groups, calibrate, score, select, prune, repair, recover."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

import prunekit.pipeline.stability as stability
from prunekit.allocation.plan import (
    allocate_select,
    check_calibration_text,
    check_offloaded_allocator,
    default_allocator_fallback,
    pruned_layers,
)
from prunekit.core.config import RunConfig
from prunekit.core.groups import PruningGroup
from prunekit.core.validation import format_validation_error
from prunekit.core.versions import package_versions
from prunekit.errors import UserError
from prunekit.io.load import DTYPES, model_source
from prunekit.pipeline.checks import check_context, check_ratio
from prunekit.pipeline.context import RunContext
from prunekit.pipeline.plan import RunPlan, plan
from prunekit.pipeline.recover import call_recovery, load_teacher, needs_teacher, teacher_option
from prunekit.pipeline.repair import RepairContext, dense_copy, needs_dense, repair_sampler, run_repair
from prunekit.pipeline.stages import apply, build_groups, calibrate
from prunekit.plugin.host import PluginHost, get_host
from prunekit.plugin.registry import Registry, get_registry
from prunekit.runtime.devices import check_offloaded_run, gradient_checkpointing, offloaded
from prunekit.runtime.modelstate import preserved


@dataclass(frozen=True)
class MethodInfo:
    """Which method pruned: its name, the plugin that provides it, the validated options and what it reported."""

    name: str
    provider: str
    options: dict[str, Any]
    info: dict[str, Any]


@dataclass
class PruneResult:
    """What :func:`prune` did. ``model`` is the caller's model, pruned in place; ``mask`` holds the kept units
    of every group (group name → layer, unit, n_units, kept); ``reduction`` the achieved reduction."""

    model: torch.nn.Module
    tokenizer: Any
    mask: dict[str, dict[str, Any]]
    reduction: dict[str, Any]
    method: MethodInfo
    config: RunConfig
    groups: list[PruningGroup]
    kept: list[torch.Tensor]
    layers: range
    layer_shapes: list[dict[str, Any]]
    uniform_shapes: bool
    calibration: dict[str, Any] | None = None
    allocation: dict[str, Any] = field(default_factory=dict)
    repair: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    grouper: dict[str, Any] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        """The run.json record: resolved config, source, method, versions, seed, calibration, layers,
        recovery, reduction, shapes, mask, metrics, timings (and errors, when a stage after pruning failed)."""
        out = {
            "config": self.config.model_dump(mode="json"),
            "model_source": self.source,
            "method": asdict(self.method),
            "versions": package_versions(),
            "seed": self.config.seed,
            "seeds": {"run": self.config.seed, "calibration": self.calibration and self.calibration["seed"]},
            "calibration": self.calibration,
            "layers_pruned": [self.layers.start, self.layers.stop],
            "grouper": self.grouper,
            "allocation": self.allocation,
            "repair": self.repair,
            "recovery": self.recovery,
            "reduction": self.reduction,
            "layer_shapes": self.layer_shapes,
            "uniform_shapes": self.uniform_shapes,
            "mask": self.mask,
            "metrics": self.metrics,
            "timings": dict(self.timings),
        }
        if self.errors:
            out["errors"] = self.errors
        return out


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


def _dtype_name(model: torch.nn.Module) -> str:
    dtype = next(model.parameters()).dtype
    return next((name for name, d in DTYPES.items() if d == dtype), "float32")


def prune(model: torch.nn.Module, tokenizer: Any = None, method: str = "moreau-gs", ratio: float = 0.25, *,
          seed: int = 42, layers: tuple[int, int] | None = None, selection: dict | None = None,
          grouper: dict | None = None, calibration: dict | None = None, repair: dict | None = None,
          recovery: dict | None = None, allocation: dict | None = None, batches: list[torch.Tensor] | None = None,
          registry: Registry | None = None, host: PluginHost | None = None, compute_dtype: str = "model",
          **options: Any) -> PruneResult:
    """Prune ``model`` in place with ``method`` at ``ratio`` and return a :class:`PruneResult`.

    ``**options`` are the method's options (``prunekit methods``). The other knobs are the run config's
    sections, validated by the same pydantic models as a config file: ``selection`` (scope, layers,
    round_to; ``layers`` is a shortcut), ``allocation`` (name, options, params_removed, layers), ``grouper``,
    ``calibration`` (source, n_samples, seq_len, batch_size, seed), ``repair`` (name, options),
    ``recovery`` (method, options).
    ``compute_dtype`` is the scoring precision (``model`` or ``float32``, docs/precision.md). ``batches``
    replaces the calibration sample with your own token-id batches. ``tokenizer`` is needed for calibration
    and recovery. Bad values raise :class:`prunekit.errors.UserError` before the model is touched.
    """
    values: dict[str, Any] = {"method": method, "method_options": options, "ratio": ratio, "seed": seed,
                              "selection": {**(selection or {}), **({"layers": layers} if layers is not None else {})},
                              "grouper": grouper or {}, "calibration": calibration or {},
                              "repair": repair or {}, "recovery": recovery or {}, "evaluation": {"enabled": False},
                              **({"allocation": allocation} if allocation is not None else {}),
                              "dtype": _dtype_name(model), "compute_dtype": compute_dtype}
    device = next(model.parameters()).device.type
    if device in ("cpu", "cuda"):
        values["device"] = device
    try:
        config = RunConfig(**values)
    except ValidationError as exc:
        raise UserError(format_validation_error("", exc)) from None
    return prune_with_config(model, tokenizer, config, registry=registry, host=host, batches=batches,
                             source=getattr(model, "name_or_path", None) or None)


@dataclass(frozen=True)
class Prepared:
    """A run checked against the loaded model: the validated plan, the config (the default allocator may fall
    back to ``uniform``) and the decoder layers that become groups."""

    run_plan: RunPlan
    config: RunConfig
    layers: range


def prepare(model: torch.nn.Module, tokenizer: Any, config: RunConfig, registry: Registry,
            batches: list[torch.Tensor] | None = None, run_plan: RunPlan | None = None) -> Prepared:
    """Every check that needs the model, run once before any work (the CLI runs it before its 'before'
    evaluation): plan, offload limits, layers, context length, tokenizer and calibration text."""
    run_plan = run_plan or plan(config, registry)
    is_offloaded = bool(offloaded(model))
    check_offloaded_allocator(config, registry, is_offloaded)
    if is_offloaded and needs_dense(run_plan.repair):
        raise UserError(f"repair.name: {config.repair.name!r} compares against a dense copy of the model, which "
                        "offloaded (meta) weights do not allow; use a device_map without cpu/disk offload")
    config = default_allocator_fallback(config, registry, tokenizer, batches, is_offloaded)
    layers = pruned_layers(config, registry.adapter_for(model).num_layers, registry)
    calibrates = run_plan.method.needs_calibration(run_plan.options) and batches is None
    check_context(model, config, calibrates)
    check_offloaded_run(model, config.method, run_plan.method.needs_calibration(run_plan.options),
                        config.recovery.method)
    if needs_teacher(run_plan.recovery) and teacher_option(run_plan.recovery_options) is not None:
        model_source(teacher_option(run_plan.recovery_options), "recovery.options.teacher")  # a missing folder
    if (calibrates or run_plan.recovery) and tokenizer is None:
        raise UserError(f"tokenizer: method {config.method!r} needs one for calibration/recovery (or pass batches=)")
    check_calibration_text(config, registry, tokenizer, batches)
    return Prepared(run_plan, config, layers)


def recover_pruned(model: torch.nn.Module, tokenizer: Any, config: RunConfig, run_plan: RunPlan,
                   dense: torch.nn.Module | None) -> dict[str, Any]:
    """The recovery stage: the trainer fine-tunes ``model`` in place; a trainer that declares ``needs_teacher``
    gets ``dense`` (the copy from before pruning), or the model its ``teacher`` option names, loaded in the
    model's dtype on its device. Returns run.json's ``recovery`` record."""
    entry, options = run_plan.recovery, run_plan.recovery_options
    record: dict[str, Any] = {"method": entry.name, "provider": entry.provider,
                              "options": options.model_dump(mode="json")}
    teacher = None
    if needs_teacher(entry):
        named = teacher_option(options)
        if named is None:
            teacher, record["teacher"] = dense, {"source": "dense copy of the model before pruning"}
        else:
            source = model_source(named, "recovery.options.teacher")
            teacher = load_teacher(source, _dtype_name(model), str(next(model.parameters()).device))
            record["teacher"] = {"source": source, "from": "recovery.options.teacher"}
    record["info"] = call_recovery(entry, options, model, tokenizer, config, teacher)
    return record


def prune_with_config(model: torch.nn.Module, tokenizer: Any, config: RunConfig, *,
                      registry: Registry | None = None, host: PluginHost | None = None,
                      batches: list[torch.Tensor] | None = None, context: RunContext | None = None,
                      source: str | None = None, prepared: Prepared | None = None) -> PruneResult:
    """:func:`prune` driven by a whole :class:`RunConfig` (the CLI's path); ``context`` lets a caller share
    the run state (timings, hooks) with its own stages, ``prepared`` the checks it already ran (:func:`prepare`).
    Stages: groups, calibrate, score, select, prune, repair, recover."""
    host = host or get_host()
    registry = registry or get_registry(host)
    prepared = prepared or prepare(model, tokenizer, config, registry, batches)
    run_plan, config, layers = prepared.run_plan, prepared.config, prepared.layers
    ctx = context or RunContext(config=config, registry=registry)
    ctx.config, ctx.model, ctx.tokenizer = config, model, tokenizer
    ctx.adapter = registry.adapter_for(model)

    with preserved(model):
        with ctx.stage("groups"):
            ctx.groups = build_groups(model, layers, run_plan.grouper, registry)
        check_ratio(ctx.groups, config, model)  # a ratio that removes nothing, a budget beyond reach: before scoring
        params_before = model.num_parameters()
        calibration = None
        if run_plan.method.needs_calibration(run_plan.options) and batches is None:
            with ctx.stage("calibrate"):
                batches, calibration = calibrate(tokenizer, config.calibration, seed=config.calibration_seed)
        # K = config.stability calibration resamples, consensus when K > 1
        with ctx.stage("score"), gradient_checkpointing(model, config.calibration.gradient_checkpointing):
            scores, method_info = stability.score(ctx, run_plan.method, run_plan.options, batches or [])
        host.pm.hook.prunekit_after_scoring(context=ctx, scores=scores)
        with ctx.stage("select"):  # budget -> units each group loses (the allocator plugin) -> kept units
            ctx.kept, allocation = allocate_select(ctx, scores, batches)
        # one untouched copy from before pruning serves the repair (needs_dense) and the recovery's teacher
        dense_teacher = needs_teacher(run_plan.recovery) and teacher_option(run_plan.recovery_options) is None
        dense = dense_copy(model) if needs_dense(run_plan.repair) or dense_teacher else None
        with ctx.stage("prune"):
            shapes = apply(model, ctx.groups, ctx.kept, registry)
        host.pm.hook.prunekit_after_pruning(context=ctx, model=model)
        repair_record = {"name": "none"}
        if run_plan.repair is not None:
            with ctx.stage("repair"):
                repair_ctx = RepairContext(model=model, adapter=registry.adapter_for(model), groups=ctx.groups,
                                           kept=ctx.kept, config=config, dense=dense,
                                           calibration=repair_sampler(tokenizer, config, batches))
                repair_record = run_repair(run_plan.repair, run_plan.repair_options, repair_ctx)
            del repair_ctx
        if not dense_teacher:
            dense = None  # freed before recovery when only the repair needed it
        recovery_record: dict[str, Any] = {"method": config.recovery.method, "info": None}
        if run_plan.recovery is not None:
            with ctx.stage("recover"):
                recovery_record = recover_pruned(model, tokenizer, config, run_plan, dense)
            dense = None

    return PruneResult(
        model=model, tokenizer=tokenizer, mask=mask_report(ctx.groups, ctx.kept),
        reduction=reduction_report(ctx.groups, ctx.kept, params_before, model.num_parameters()),
        method=MethodInfo(run_plan.method.name, run_plan.method.provider,
                          run_plan.options.model_dump(mode="json"), method_info),
        config=config, groups=ctx.groups, kept=ctx.kept, layers=layers, layer_shapes=[s.as_dict() for s in shapes],
        uniform_shapes=not getattr(model.config, "prunekit_layer_shapes", None), calibration=calibration,
        grouper=run_plan.grouper.describe(), allocation=allocation, repair=repair_record,
        recovery=recovery_record, source=source, timings=ctx.timings,
    )
