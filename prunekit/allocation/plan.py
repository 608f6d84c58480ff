"""The run config's allocation plumbing: which layers become groups, which allocator runs, and the one call the
pipeline makes (budget → counts → kept units)."""

from __future__ import annotations

import logging
from typing import Any

import torch

import prunekit.allocation.cache as allocation_cache
from prunekit.allocation.base import AllocationContext, allocate, check_counts
from prunekit.core.budget import make_budget, unit_cost
from prunekit.core.select import keep_from_counts
from prunekit.errors import UserError

log = logging.getLogger("prunekit.allocation")


def layers_mode(config, registry=None) -> str:
    """``allocation.layers`` as given, else the allocator's own ``default_layers`` (``measured``: all), else
    "default" (LLM-Pruner's range)."""
    if config.allocation.layers is not None:
        return config.allocation.layers
    if registry is None:
        from prunekit.plugin.registry import get_registry

        registry = get_registry()
    try:
        impl = registry.named("allocators", allocator_name(config)).impl
    except UserError:
        return "default"
    return getattr(impl, "default_layers", "default")


def pruned_layers(config, n_layers: int, registry=None) -> range:
    """Layers whose blocks become groups: explicit ``selection.layers``, every layer for
    ``allocation.layers: all`` (the allocator decides), else the LLM-Pruner default."""
    from prunekit.core.layers import resolve_layers

    if config.selection.layers is None and layers_mode(config, registry) == "all":
        return range(n_layers)
    return resolve_layers(n_layers, config.selection.layers)


def ratio_budget_layers(config, n_layers: int) -> range:
    """The layers a ``ratio`` budget is counted over: ``selection.layers`` or LLM-Pruner's default range, so
    ``--ratio 0.25`` names the same number of parameters whichever layers the allocator may then touch."""
    from prunekit.core.layers import resolve_layers

    return resolve_layers(n_layers, config.selection.layers)


def allocator_name(config) -> str:
    """``selection.scope: global`` with ``uniform`` or no allocator named keeps its old meaning (the global
    allocator)."""
    name = config.allocation.name
    if config.selection.scope == "global" and (name == "uniform" or "name" not in config.allocation.model_fields_set):
        return "global"
    return name


def allocator_plan(config, registry) -> tuple[str, Any, Any]:
    """The configured allocator's name, registry entry and validated options (fails before any work)."""
    from prunekit.core.validation import validate_options

    name = allocator_name(config)
    entry = registry.named("allocators", name)
    return name, entry, validate_options(entry.impl.Options, config.allocation.options, "allocation.options.")


def needs_calibration(config, registry) -> bool:
    """Whether the configured allocator measures the calibration loss (class attribute ``needs_calibration``)."""
    _, entry, options = allocator_plan(config, registry)
    flag = getattr(entry.impl, "needs_calibration", False)
    return bool(flag(options) if callable(flag) else flag)


def check_calibration_text(config, registry, tokenizer, batches) -> None:
    """A measuring allocator needs text: a tokenizer, or the caller's calibration batches (fails before any work)."""
    if tokenizer is None and not batches and needs_calibration(config, registry):
        raise UserError(f"tokenizer: allocator {allocator_name(config)!r} measures the calibration loss and needs a "
                        "tokenizer (or pass batches=)")


def default_allocator_fallback(config, registry, tokenizer, batches, offloaded: bool = False):
    """The default allocator (none named) when it measures the calibration loss but cannot: the run has no
    text (a data-free method through the API without a tokenizer), or the model is offloaded (its probe zeroes
    weights that live on ``meta``). ``uniform`` instead, logged; a named allocator is never replaced
    (:func:`check_calibration_text` and :func:`check_offloaded_allocator` fail instead)."""
    if "name" in config.allocation.model_fields_set or not needs_calibration(config, registry):
        return config
    if offloaded:
        reason = "the model is offloaded (the probe cannot zero meta weights)"
    elif tokenizer is None and not batches:
        reason = "no tokenizer or calibration batches"
    else:
        return config
    log.info("allocation: %s for the default measured allocator; using uniform", reason)
    allocation = config.allocation.model_copy(update={"name": "uniform"})
    return config.model_copy(update={"allocation": allocation})


def check_offloaded_allocator(config, registry, offloaded: bool) -> None:
    """A measuring allocator named explicitly cannot probe an offloaded model: fail before any work."""
    if offloaded and "name" in config.allocation.model_fields_set and needs_calibration(config, registry):
        raise UserError(f"allocation.name: allocator {allocator_name(config)!r} measures the loss of zeroed units, "
                        "which offloaded (meta) weights do not allow; use --allocator uniform or global, or a "
                        "device_map without cpu/disk offload")


def batches_sample(batches: list[torch.Tensor], n_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Probe windows cut from the caller's calibration batches when there is no tokenizer: the first
    ``n_samples`` rows, each cut to ``seq_len`` tokens."""
    width = min(b.shape[-1] for b in batches)
    rows = torch.cat([b.reshape(-1, b.shape[-1])[:, :width] for b in batches])[:n_samples, :seq_len]
    return list(rows.split(8))


def allocate_select(ctx, scores: list[torch.Tensor],
                    batches: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Budget → counts (the configured allocator plugin) → kept units per group; for ``pipeline.run``.

    ``ctx`` is the run's state (config, registry, model, adapter, groups); ``batches``: the calibration
    batches, the probe text of a measuring allocator when the run has no tokenizer.
    """
    config, groups = ctx.config, ctx.groups
    name, entry, options = allocator_plan(config, ctx.registry)
    costs = [unit_cost(ctx.model, g) for g in groups]
    round_to = config.selection.round_to
    # a ratio means what LLM-Pruner's uniform ratio removes over ITS layers, whichever layers the allocator may touch
    ratio_layers = set(ratio_budget_layers(config, ctx.adapter.num_layers))
    in_range = [i for i, g in enumerate(groups) if g.layer in ratio_layers]
    budget = make_budget([groups[i] for i in in_range], [costs[i] for i in in_range], ctx.model.num_parameters(),
                         config.ratio, config.allocation.params_removed, round_to)

    def sample(n_samples: int, seq_len: int) -> list[torch.Tensor]:
        from prunekit.data.sources import calibration_batches

        if ctx.tokenizer is None:
            if not batches:
                raise UserError("tokenizer: this allocator measures the calibration loss and needs a tokenizer")
            return batches_sample(batches, n_samples, seq_len)
        c = config.calibration
        seed = config.calibration_seed
        ids, _ = calibration_batches(ctx.tokenizer, source=c.source, n_samples=n_samples, seq_len=seq_len,
                                     seed=seed + 1)  # probe windows apart from the scoring sample
        return list(ids.split(8))

    actx = AllocationContext(model=ctx.model, groups=groups, scores=scores, costs=costs, budget=budget,
                             round_to=round_to, seed=config.seed, layers=ctx.adapter.layers(), sample=sample)
    key = None
    if allocation_cache.active() and config.allocation.cache and needs_calibration(config, ctx.registry):
        probe_text = ({"source": config.calibration.source, "seed": config.calibration_seed + 1}
                      if ctx.tokenizer is not None else {"batches": [b.tolist() for b in batches or []]})
        settings = {"allocator": name, "options": options.model_dump(mode="json"), "budget": budget.params,
                    "total": budget.total, "ratio": budget.ratio, "round_to": round_to, "seed": config.seed,
                    "probe_text": probe_text}
        key = allocation_cache.cache_key(ctx.model, ctx.tokenizer, scores, groups, costs, settings)
    hit = allocation_cache.read(key) if key else None
    if hit is not None:  # the probe is skipped; the counts are checked like a fresh result
        counts, info = hit
        check_counts(actx, counts, name)
    else:
        counts, info = allocate(actx, name, entry.impl(options))
        if key:
            allocation_cache.write(key, counts, info)
    info["provider"] = entry.provider
    if key:
        info["cache"] = {"hit": hit is not None, "key": key}
    return keep_from_counts(groups, scores, counts), info
