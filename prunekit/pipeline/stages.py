"""The stages of a run as plain functions on plain values: build groups, calibrate, score, apply."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from prunekit.adapters.base import LayerShape
from prunekit.adapters.grouping import apply_plan
from prunekit.core.component_config import GrouperConfig
from prunekit.core.config import CalibrationConfig, RunConfig
from prunekit.core.groups import PruningGroup
from prunekit.core.layers import resolve_layers
from prunekit.core.validation import format_validation_error, validate_options
from prunekit.errors import UserError
from prunekit.plugin.registry import Registry, Resolved, get_registry
from prunekit.runtime.devices import for_pruning, for_scoring, offloaded
from prunekit.runtime.modelstate import computed_in, preserved


def build_groups(model: torch.nn.Module, layers: range | tuple[int, int] | None = None,
                 grouper: GrouperConfig | Resolved | BaseModel | dict | None = None,
                 registry: Registry | None = None) -> list[PruningGroup]:
    """The pruning groups of ``model`` (every method scores exactly these) over ``layers`` (a range,
    [start, end), or None for the default range). ``grouper`` names a registered grouper and its options
    (``{"name": "blocks", "options": {...}}``; default: ``blocks``)."""
    registry = (registry or get_registry())
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

    Settings are :class:`prunekit.core.config.CalibrationConfig` fields (source, n_samples, seq_len, batch_size,
    seed), given as a model, a dict or keywords; an unset seed is the run default, 42.
    """
    from prunekit.data.sources import calibration_batches

    c = _section(CalibrationConfig, calibration, fields, "calibration.")
    ids, info = calibration_batches(tokenizer, source=c.source, n_samples=c.n_samples, seq_len=c.seq_len,
                                    seed=RunConfig.model_fields["seed"].default if c.seed is None else c.seed)
    return list(ids.split(c.batch_size)), info


def score(model: torch.nn.Module, groups: list[PruningGroup], method: str, batches: list[torch.Tensor] = (),
          *, options: BaseModel | dict | None = None, seed: int = 42,
          compute_dtype: torch.dtype | str | None = None,
          registry: Registry | None = None, sampler: Any = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """One float32 CPU score per unit of every group (higher = keep) and the method's info.

    ``compute_dtype`` None / ``"model"`` (default) scores in the model's own dtype, with float32 gradient
    sums per prunable weight (docs/precision.md); ``float32`` casts the model up for scoring (lossless for
    any load dtype and undone afterwards); benchmarks pass a lower precision to measure what it changes —
    casting a float32 model down and back is not lossless. The model's dtype/device/requires_grad come
    back as they were. ``sampler`` (a :class:`prunekit.data.sampling.CalibrationSampler`) lets methods draw
    fresh calibration samples.
    """
    from prunekit.importance.precision import resolve_compute_dtype, scoring_dtype

    entry = (registry or get_registry()).method(method)
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
    from prunekit.importance.base import ScoringContext

    return ScoringContext(model=model, groups=groups, batches=batches, seed=seed, sampler=sampler)


def apply(model: torch.nn.Module, groups: list[PruningGroup], kept: list[torch.Tensor],
          registry: Registry | None = None) -> list[LayerShape]:
    """Physically remove every unit not in ``kept`` (torch-pruning) and update the model's config; returns
    the per-layer shapes. Parameter names stay; new weight tensors keep their dtype and device."""
    adapter = (registry or get_registry()).adapter_for(model)
    with preserved(model), for_pruning(model, groups):  # offloaded weights: onloaded, pruned, written back
        apply_plan(model, adapter, groups, kept)
        return adapter.sync_config()


def _section(model_cls: type[BaseModel], given: BaseModel | dict | None, extra: dict, prefix: str) -> Any:
    """A config section from a model or a dict, with keyword overrides, validated (UserError naming the field)."""
    if isinstance(given, model_cls) and not extra:
        return given
    values = given.model_dump() if isinstance(given, BaseModel) else dict(given or {})
    return validate_options(model_cls, {**values, **extra}, prefix)
