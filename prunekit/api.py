"""The public Python API: prune a model you already hold, evaluate it, save it (docs/api.md).

``prune`` works in place on any model a registered adapter knows, on any device and in any dtype, and
hands the model back in the dtype/device/``requires_grad`` state it came in (scoring runs in the model's dtype
with float32 sums per prunable weight, docs/precision.md).
The CLI (``prunekit run``) and the benchmark harness are built on these functions: load → ``prune`` →
``evaluate`` → ``save``. The stage functions (``build_groups``, ``calibrate``, ``score``, ``select``,
``apply``) are public too, for callers that compose their own experiments.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from prunekit.adapters.base import LayerShape
from prunekit import stability
from prunekit.allocate import (allocate_select, allocator_plan, check_calibration_text, check_offloaded_allocator,
                               default_allocator_fallback, pruned_layers)
from prunekit.checks import check_context, check_ratio
from prunekit.config import CalibrationConfig, RunConfig
from prunekit.context import RunContext
from prunekit.devices import check_offloaded_run, for_pruning, for_scoring, gradient_checkpointing, offloaded
from prunekit.errors import UserError
from prunekit.evaluate import EvalSpec, evaluate_model, plugin_evaluators
from prunekit.export import check_output_dir, load_pruned, save_pruned
from prunekit.finite import check_weights_finite
from prunekit.component_config import GrouperConfig
from prunekit.grouping import apply_plan
from prunekit.groups import PruningGroup
from prunekit.modelstate import computed_in, preserved
from prunekit.plugins import PluginHost, get_host
from prunekit.registry import (MethodEntry, NamedEntry, Registry, Resolved, format_validation_error,
                               validate_options)
from prunekit.select import select

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUN_SWITCHES = ("enabled", "cache")
VERSIONED = ("prunekit", "torch", "transformers", "torch-pruning", "peft", "lm-eval", "datasets", "pluggy", "pydantic")

__all__ = ["MethodInfo", "PruneResult", "apply", "build_groups", "calibrate", "evaluate", "load_model", "prune",
           "prune_with_config", "save", "score", "select"]


# ------------------------------------------------------------------------------------ results


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


def package_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    """Python and the versions of the packages a result depends on (run.json, the metrics cache key)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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


# ------------------------------------------------------------------------------------ loading


def load_model(source: str | None = None, dtype: str = "float32", device: str = "cpu", *,
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               offload_folder: str | Path | None = None) -> tuple[Any, Any, str]:
    """Model (eval mode), tokenizer and resolved source from a local path, a hub id or (``None``) the
    embedded default model; prunekit checkpoints with per-layer shapes included. ``device`` is cpu, cuda or
    cuda:N; ``device_map``/``max_memory``/``offload_folder`` place it with accelerate instead (docs/devices.md)."""
    from transformers import AutoTokenizer

    from prunekit.devices import placement

    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not supported (accepted: {', '.join(DTYPES)})")
    where = placement(device, device_map, max_memory, offload_folder)
    if source is None:
        from prunekit.assets import default_model_dir

        source = str(default_model_dir())
    try:
        model = load_pruned(source, dtype=DTYPES[dtype], **where)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except UserError:
        raise
    except Exception as exc:  # corrupt/truncated weights, bad JSON, unknown type: all "cannot load"
        hint = " (offline: pass a local directory)" if not Path(source).exists() else ""
        raise UserError(f"model: cannot load {source!r}: {(str(exc).splitlines() or [type(exc).__name__])[0]}{hint}") from None
    check_weights_finite(model, source)  # NaN/Inf weights: named now, not as a NaN model later
    return model.eval(), tokenizer, source


# ------------------------------------------------------------------------------------- stages


def default_layers(n_layers: int) -> range:
    """LLM-Pruner's default (keep 4 first and 2 last of 32 layers), scaled to the model's depth."""
    first, last = round(4 * n_layers / 32), round(2 * n_layers / 32)
    return range(first, n_layers - last)


def resolve_layers(n_layers: int, requested: tuple[int, int] | None) -> range:
    """The decoder layers to prune: ``requested`` [start, end) checked against the model, or the default."""
    if requested is None:
        return default_layers(n_layers)
    start, end = requested
    if end > n_layers:
        raise UserError(f"selection.layers: [{start}, {end}) is outside the model's {n_layers} layers "
                        f"(accepted: 0 <= start < end <= {n_layers})")
    return range(start, end)


def _registry(registry: Registry | None) -> Registry:
    return registry or Registry.from_host(get_host())


def build_groups(model: torch.nn.Module, layers: range | tuple[int, int] | None = None,
                 grouper: GrouperConfig | Resolved | BaseModel | dict | None = None,
                 registry: Registry | None = None) -> list[PruningGroup]:
    """The pruning groups of ``model`` (every method scores exactly these) over ``layers`` (a range,
    [start, end), or None for the default range). ``grouper`` names a registered grouper and its options
    (``{"name": "blocks", "options": {...}}``; default: ``blocks``)."""
    registry = _registry(registry)
    adapter = registry.adapter_for(model)
    if not isinstance(layers, range):
        layers = resolve_layers(adapter.num_layers, tuple(layers) if layers is not None else None)
    if not isinstance(grouper, Resolved):
        try:  # a GrouperConfig, a dict, or the blocks grouper's own options model
            config = GrouperConfig.model_validate(grouper or {})
        except ValidationError as exc:
            raise UserError(format_validation_error("grouper.", exc)) from None
        grouper = registry.resolve("groupers", config.name, config.options, "grouper.options.")
    return grouper(model, adapter, layers)


def calibrate(tokenizer: Any, calibration: CalibrationConfig | dict | None = None,
              **fields: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Seeded calibration token batches (``calibration.batch_size`` sequences each) and their provenance.

    Settings are :class:`prunekit.config.CalibrationConfig` fields (source, n_samples, seq_len, batch_size,
    seed), given as a model, a dict or keywords; an unset seed is the run default, 42.
    """
    from prunekit.data import calibration_batches

    c = _section(CalibrationConfig, calibration, fields, "calibration.")
    ids, info = calibration_batches(tokenizer, source=c.source, n_samples=c.n_samples, seq_len=c.seq_len,
                                    seed=RunConfig.model_fields["seed"].default if c.seed is None else c.seed)
    return list(ids.split(c.batch_size)), info


def calibration_seed(config: RunConfig) -> int:
    """The calibration sample's seed: ``calibration.seed`` when set, else the run's ``seed``."""
    return config.seed if config.calibration.seed is None else config.calibration.seed


def score(model: torch.nn.Module, groups: list[PruningGroup], method: str, batches: list[torch.Tensor] = (),
          *, options: BaseModel | dict | None = None, seed: int = 42,
          compute_dtype: torch.dtype | str | None = None,
          registry: Registry | None = None, sampler: Any = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """One float32 CPU score per unit of every group (higher = keep) and the method's info.

    ``compute_dtype`` None / ``"model"`` (default) scores in the model's own dtype, with float32 gradient
    sums per prunable weight (docs/precision.md); ``float32`` casts the model up for scoring (lossless for
    any load dtype and undone afterwards); benchmarks pass a lower precision to measure what it changes —
    casting a float32 model down and back is not lossless. The model's dtype/device/requires_grad come
    back as they were. ``sampler`` (a :class:`prunekit.sampling.CalibrationSampler`) lets methods draw
    fresh calibration samples.
    """
    from prunekit.precision import resolve_compute_dtype, scoring_dtype

    entry = _registry(registry).method(method)
    opts = options if isinstance(options, BaseModel) else entry.options(options or {})
    compute_dtype = resolve_compute_dtype(compute_dtype)
    cast = (computed_in(model, compute_dtype) if compute_dtype is not None and not offloaded(model)
            else preserved(model))  # offloaded (meta) weights cannot be cast
    with for_scoring(model, groups, entry.name, entry.needs_calibration(opts)), cast:
        scoring_ctx = _scoring_context(model, groups, list(batches), seed, sampler)
        scoring_ctx.info["precision"] = scoring_dtype(model, compute_dtype)
        scores = [s.detach().float().cpu() for s in entry.cls(opts).scores(scoring_ctx)]
    if len(scores) != len(groups) or any(s.numel() != g.n_units for s, g in zip(scores, groups)):
        raise RuntimeError(f"method {entry.name!r} returned scores that do not match the groups")
    return scores, scoring_ctx.info


def _scoring_context(model, groups, batches, seed, sampler=None):
    from prunekit.importance import ScoringContext

    return ScoringContext(model=model, groups=groups, batches=batches, seed=seed, sampler=sampler)


def apply(model: torch.nn.Module, groups: list[PruningGroup], kept: list[torch.Tensor],
          registry: Registry | None = None) -> list[LayerShape]:
    """Physically remove every unit not in ``kept`` (torch-pruning) and update the model's config; returns
    the per-layer shapes. Parameter names stay; new weight tensors keep their dtype and device."""
    adapter = _registry(registry).adapter_for(model)
    with preserved(model), for_pruning(model, groups):  # offloaded weights: onloaded, pruned, written back
        apply_plan(model, adapter, groups, kept)
        return adapter.sync_config()


# -------------------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class RunPlan:
    """A config checked against the registry before any work: the method and recovery trainer, validated."""

    method: MethodEntry
    options: BaseModel
    grouper: Resolved
    recovery: NamedEntry | None
    recovery_options: BaseModel | None


def plan(config: RunConfig, registry: Registry | None = None) -> RunPlan:
    """Validate a config's method, method options, grouper and recovery (UserError naming the field) without touching a model."""
    registry = _registry(registry)
    entry = registry.method(config.method)
    options = entry.options(config.method_options)
    grouper = registry.resolve("groupers", config.grouper.name, config.grouper.options, "grouper.options.")
    allocator_plan(config, registry)  # an unknown allocator or a bad allocator option fails before any work
    recovery = None if config.recovery.method == "none" else registry.named("recovery", config.recovery.method)
    recovery_options = (validate_options(recovery.impl.Options, config.recovery.options, "recovery.options.")
                        if recovery else None)
    return RunPlan(entry, options, grouper, recovery, recovery_options)


def _section(model_cls: type[BaseModel], given: BaseModel | dict | None, extra: dict, prefix: str) -> Any:
    """A config section from a model or a dict, with keyword overrides, validated (UserError naming the field)."""
    if isinstance(given, model_cls) and not extra:
        return given
    values = given.model_dump() if isinstance(given, BaseModel) else dict(given or {})
    return validate_options(model_cls, {**values, **extra}, prefix)


def _dtype_name(model: torch.nn.Module) -> str:
    dtype = next(model.parameters()).dtype
    return next((name for name, d in DTYPES.items() if d == dtype), "float32")


def prune(model: torch.nn.Module, tokenizer: Any = None, method: str = "moreau-gs", ratio: float = 0.25, *,
          seed: int = 42, layers: tuple[int, int] | None = None, selection: dict | None = None,
          grouper: dict | None = None, calibration: dict | None = None, recovery: dict | None = None,
          allocation: dict | None = None, batches: list[torch.Tensor] | None = None, registry: Registry | None = None,
          host: PluginHost | None = None, compute_dtype: str = "model", **options: Any) -> PruneResult:
    """Prune ``model`` in place with ``method`` at ``ratio`` and return a :class:`PruneResult`.

    ``**options`` are the method's options (``prunekit methods``). The other knobs are the run config's
    sections, validated by the same pydantic models as a config file: ``selection`` (scope, layers,
    round_to; ``layers`` is a shortcut), ``allocation`` (name, options, params_removed, layers), ``grouper``,
    ``calibration`` (source, n_samples, seq_len, batch_size, seed), ``recovery`` (method, options).
    ``compute_dtype`` is the scoring precision (``model`` or ``float32``, docs/precision.md). ``batches``
    replaces the calibration sample with your own token-id batches. ``tokenizer`` is needed for calibration
    and recovery. Bad values raise :class:`prunekit.errors.UserError` before the model is touched.
    """
    values: dict[str, Any] = {"method": method, "method_options": options, "ratio": ratio, "seed": seed,
                              "selection": {**(selection or {}), **({"layers": layers} if layers is not None else {})},
                              "grouper": grouper or {}, "calibration": calibration or {},
                              "recovery": recovery or {}, "evaluation": {"enabled": False},
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


def prune_with_config(model: torch.nn.Module, tokenizer: Any, config: RunConfig, *,
                      registry: Registry | None = None, host: PluginHost | None = None,
                      batches: list[torch.Tensor] | None = None, context: RunContext | None = None,
                      source: str | None = None) -> PruneResult:
    """:func:`prune` driven by a whole :class:`RunConfig` (the CLI's path); ``context`` lets a caller share
    the run state (timings, hooks) with its own stages. Stages: groups, calibrate, score, select, prune, recover."""
    host = host or get_host()
    registry = registry or Registry.from_host(host)
    run_plan = plan(config, registry)
    is_offloaded = bool(offloaded(model))
    check_offloaded_allocator(config, registry, is_offloaded)
    config = default_allocator_fallback(config, registry, tokenizer, batches, is_offloaded)
    ctx = context or RunContext(config=config, registry=registry)
    ctx.config, ctx.model, ctx.tokenizer = config, model, tokenizer
    ctx.adapter = registry.adapter_for(model)
    layers = pruned_layers(config, ctx.adapter.num_layers, registry)
    check_context(model, config, run_plan.method.needs_calibration(run_plan.options) and batches is None)
    check_offloaded_run(model, config.method, run_plan.method.needs_calibration(run_plan.options), config.recovery.method)
    needs_tokenizer = (run_plan.method.needs_calibration(run_plan.options) and batches is None) or run_plan.recovery
    if needs_tokenizer and tokenizer is None:
        raise UserError(f"tokenizer: method {config.method!r} needs one for calibration/recovery (or pass batches=)")
    check_calibration_text(config, registry, tokenizer, batches)

    with preserved(model):
        with ctx.stage("groups"):
            ctx.groups = build_groups(model, layers, run_plan.grouper, registry)
        check_ratio(ctx.groups, config)  # a ratio that rounds to removing nothing fails before scoring
        params_before = model.num_parameters()
        calibration = None
        if run_plan.method.needs_calibration(run_plan.options) and batches is None:
            with ctx.stage("calibrate"):
                batches, calibration = calibrate(tokenizer, config.calibration, seed=calibration_seed(config))
        # K = config.stability calibration resamples, consensus when K > 1
        with ctx.stage("score"), gradient_checkpointing(model, config.calibration.gradient_checkpointing):
            scores, method_info = stability.score(ctx, run_plan.method, run_plan.options, batches or [])
        host.pm.hook.prunekit_after_scoring(context=ctx, scores=scores)
        with ctx.stage("select"):  # budget -> units each group loses (the allocator plugin) -> kept units
            ctx.kept, allocation = allocate_select(ctx, scores, batches)
        with ctx.stage("prune"):
            shapes = apply(model, ctx.groups, ctx.kept, registry)
        host.pm.hook.prunekit_after_pruning(context=ctx, model=model)
        recovery_info = None
        if run_plan.recovery is not None:
            with ctx.stage("recover"):
                recovery_info = run_plan.recovery.impl(run_plan.recovery_options).recover(model, tokenizer, config)

    return PruneResult(
        model=model, tokenizer=tokenizer, mask=mask_report(ctx.groups, ctx.kept),
        reduction=reduction_report(ctx.groups, ctx.kept, params_before, model.num_parameters()),
        method=MethodInfo(run_plan.method.name, run_plan.method.provider,
                          run_plan.options.model_dump(mode="json"), method_info),
        config=config, groups=ctx.groups, kept=ctx.kept, layers=layers, layer_shapes=[s.as_dict() for s in shapes],
        uniform_shapes=not getattr(model.config, "prunekit_layer_shapes", None), calibration=calibration,
        grouper=run_plan.grouper.describe(), allocation=allocation,
        recovery={"method": config.recovery.method, "info": recovery_info}, source=source, timings=ctx.timings,
    )


# ----------------------------------------------------------------------------------- evaluate


def eval_spec(spec: EvalSpec | dict | None = None, **fields: Any) -> EvalSpec:
    """An :class:`prunekit.evaluate.EvalSpec` from a spec, a dict and/or keywords, validated (UserError)."""
    if isinstance(spec, EvalSpec) and not fields:
        return spec
    values = {**(spec.model_dump() if isinstance(spec, BaseModel) else dict(spec or {})), **fields}
    try:  # a run's EvaluationConfig adds switches (enabled, cache) that are not evaluation settings
        return EvalSpec(**{k: v for k, v in values.items() if k not in RUN_SWITCHES})
    except ValidationError as exc:
        raise UserError(format_validation_error("evaluation.", exc)) from None


def evaluate(model: torch.nn.Module, tokenizer: Any, spec: EvalSpec | dict | None = None, *, cache: bool = False,
             refresh: bool = False, progress: bool = False, registry: Registry | None = None,
             cache_dir: str | Path | None = None, **fields: Any) -> dict[str, Any]:
    """Perplexity (with standard errors), zero-shot accuracy through lm-eval and plugin evaluators of ``model``.

    ``spec``/``**fields`` are :class:`EvalSpec` settings (default: the quick setting). With ``cache=True``
    the metrics are read from / written to prunekit's cache, keyed by a hash of the model's weights,
    config and tokenizer, the settings and package versions (``refresh=True`` recomputes); the result then
    says so under ``cache``. The model comes back in the mode it came in.
    """
    spec = eval_spec(spec, **fields)
    plugin_evaluators(spec, registry)  # an unknown evaluator fails before any work
    compute = functools.partial(evaluate_model, model, tokenizer, spec, progress=progress, registry=registry)
    if not cache:
        return compute()
    from prunekit.metrics_cache import cached_metrics

    settings = {k: v for k, v in spec.model_dump(mode="json").items() if k in EvalSpec.model_fields}
    return cached_metrics(model, tokenizer, settings, compute, root=cache_dir, refresh=refresh)


# --------------------------------------------------------------------------------------- save


def save(result: PruneResult, out_dir: str | Path, *, metrics: dict[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Write the pruned model, its tokenizer and run.json into ``out_dir`` (all-or-nothing), the same files
    as ``prunekit run``. ``metrics`` (e.g. ``{"before": ..., "after": ...}``) replace ``result.metrics``."""
    out = Path(out_dir)
    check_output_dir(out, overwrite, result.source)
    if metrics is not None:
        result.metrics = metrics
    save_pruned(result.model, result.tokenizer, out, result.manifest(), overwrite=overwrite)
    return out
