"""Allocation: a budget becomes how many units each pruning group loses.

Allocator plugins decide the counts; the core owns the budget maths (per-unit parameter costs, the
per-layer ratio as a parameter target), the feasible counts of every group (GQA partitions, ``round_to``)
and checks that what a plugin returns is feasible and within the budget. A budget that cannot be met
exactly is met from below; the gap is reported.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F

from prunekit.errors import UserError
from prunekit.groups import PruningGroup
from prunekit.select import keep_from_counts, removal

log = logging.getLogger("prunekit.allocate")
BlockKinds = tuple[Literal["attention", "mlp"], ...]


# ------------------------------------------------------------------------------ budget maths


def unit_cost(model: torch.nn.Module, group: PruningGroup) -> int:
    """Parameters one unit of ``group`` owns across its coupled slices (weights and output biases)."""
    cost = 0
    for s in group.slices:
        module = model.get_submodule(s.module_name)
        per_channel = module.weight.shape[1 - s.dim]
        if s.dim == 0 and getattr(module, "bias", None) is not None:
            per_channel += 1
        cost += per_channel * s.channels.shape[1]
    return cost


def feasible_counts(group: PruningGroup, round_to: int = 1) -> list[int]:
    """Every number of units ``group`` may lose, ascending (0 included; at least one unit stays).

    Partitioned groups (query heads inside KV groups) lose the same number in every partition; MLP
    widths stay a multiple of ``round_to`` when the width is one.
    """
    if group.partition is not None:
        n_parts = len(group.partition.unique())
        per_part = group.n_units // n_parts
        return [n_parts * k for k in range(per_part)]
    step = round_to if (group.unit == "channel" and round_to > 1 and group.n_units % round_to == 0) else 1
    return list(range(0, group.n_units - step + 1, step))


def floor_feasible(group: PruningGroup, count: int, round_to: int = 1) -> int:
    """The largest feasible count not above ``count``."""
    best = 0
    for c in feasible_counts(group, round_to):
        if c > count:
            break
        best = c
    return best


def ratio_counts(groups: list[PruningGroup], ratio: float, round_to: int = 1) -> list[int]:
    """LLM-Pruner's per-layer ratio: nearest to ratio*n in every group (at least one unit kept)."""
    counts = []
    for g in groups:
        if g.partition is None:
            multiple = round_to if g.unit == "channel" else 1
            keep = g.n_units - int(math.floor(ratio * g.n_units + 0.5))
            if multiple > 1 and g.n_units % multiple == 0:
                keep = max(multiple, int(round(keep / multiple)) * multiple)
            counts.append(g.n_units - max(1, min(g.n_units, keep)))
        else:
            n_parts = len(g.partition.unique())
            per_part = g.n_units // n_parts
            keep = per_part - int(math.floor(ratio * per_part + 0.5))
            counts.append(n_parts * (per_part - max(1, min(per_part, keep))))
    return counts


def search_ratio(counts_at: Callable[[float], list[int]], cost: Callable[[list[int]], int], target: int) -> list[int]:
    """Counts at the largest ratio whose removed parameters stay within ``target`` (bisection; the
    removal of a ratio rule only grows with the ratio)."""
    lo, hi = 0.0, 1.0
    best = counts_at(0.0)
    if cost(best) > target:
        return [0] * len(best)
    for _ in range(50):
        mid = (lo + hi) / 2
        counts = counts_at(mid)
        if cost(counts) <= target:
            lo, best = mid, counts
        else:
            hi = mid
    return best


@dataclass(frozen=True)
class Budget:
    """What may be removed: at most ``params`` parameters (of ``total``), and the per-layer ``ratio`` it
    came from when the user gave a ratio rather than a parameter fraction."""

    params: int
    total: int
    ratio: float | None = None

    @property
    def fraction(self) -> float:
        return self.params / self.total


# ------------------------------------------------------------------------------ loss probe


class LossProbe:
    """Calibration loss of the model with some units' outputs zeroed, without gradients.

    Zeroing a unit's input columns of o_proj / down_proj equals removing it (the pruned model's logits
    equal those of the zeroed original). The inputs of every decoder layer are cached from one dense
    pass, so a change in layer L re-runs only layers L.. and the head.
    """

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList, batches: list[torch.Tensor]):
        self.model, self.layers, self.batches = model, layers, batches
        self._inputs: list[list[tuple[tuple, dict]]] = []
        self.base = self._capture()

    @torch.no_grad()
    def _capture(self) -> float:
        """Dense loss, recording each layer's positional and keyword inputs for every batch."""
        records: list[tuple[tuple, dict]] = []

        def hook(_module, args, kwargs):
            records.append((args, dict(kwargs)))

        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self.layers]
        total, count = 0.0, 0
        try:
            for batch in self.batches:
                records.clear()
                logits = self.model(input_ids=batch.to(self._device), use_cache=False).logits
                self._inputs.append(list(records))
                nll, n = self._nll(logits, batch)
                total, count = total + nll, count + n
        finally:
            for h in handles:
                h.remove()
        if any(len(r) != len(self.layers) or any(not a for a, _ in r) for r in self._inputs):
            self._inputs = []  # a model that calls its layers differently: fall back to full passes
        return total / count

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
        targets = batch[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="sum")
        return float(nll), targets.numel()

    @torch.no_grad()
    def _suffix_logits(self, b: int, start: int) -> torch.Tensor:
        hidden = self._inputs[b][start][0][0]
        for i in range(start, len(self.layers)):
            args, kw = self._inputs[b][i]
            out = self.layers[i](hidden, *args[1:], **kw)
            hidden = out[0] if isinstance(out, tuple) else out
        decoder = self.model.get_decoder()
        return self.model.get_output_embeddings()(decoder.norm(hidden))

    @torch.no_grad()
    def rebase(self, removed: dict[int, tuple[PruningGroup, torch.Tensor]]) -> float:
        """Re-record every layer's inputs with ``removed`` applied and return that loss: later calls of
        :meth:`loss` whose removals differ from ``removed`` only in layers >= ``start`` may then re-run
        from ``start`` (a local search re-measures one move at a time)."""
        saved = self._zero(removed)
        try:
            self._inputs = []
            return self._capture()
        finally:
            self._restore(saved)

    def _zero(self, removed: dict[int, tuple[PruningGroup, torch.Tensor]]) -> list:
        saved = []
        for group, units in removed.values():
            if units.numel() == 0:
                continue
            for s in group.slices:
                if s.dim != 1:
                    continue
                weight = self.model.get_submodule(s.module_name).weight
                cols = group.channels_of(units, s)
                saved.append((weight, cols, weight[:, cols].clone()))
                weight[:, cols] = 0
        return saved

    @staticmethod
    def _restore(saved: list) -> None:
        for weight, cols, values in reversed(saved):
            weight[:, cols] = values

    @torch.no_grad()
    def loss(self, removed: dict[int, tuple[PruningGroup, torch.Tensor]], start: int | None = None) -> float:
        """Mean calibration NLL with the given units removed ({key: (group, removed unit indices)}).

        ``start``: re-run from this layer (the cached inputs must already reflect every removal before it,
        see :meth:`rebase`); default: the first layer with a removal, from the dense inputs.
        """
        saved = self._zero(removed)
        try:
            first = min((g.layer for g, u in removed.values() if u.numel()), default=len(self.layers))
            if start is not None:
                first = min(start, len(self.layers) - 1)
            total, count = 0.0, 0
            for b, batch in enumerate(self.batches):
                if first >= len(self.layers):
                    return self.base
                if self._inputs and hasattr(self.model.get_decoder(), "norm"):
                    logits = self._suffix_logits(b, first)
                else:
                    logits = self.model(input_ids=batch.to(self._device), use_cache=False).logits
                nll, n = self._nll(logits, batch)
                total, count = total + nll, count + n
            return total / count
        finally:
            self._restore(saved)


# ------------------------------------------------------------------------------ the allocator contract


@dataclass
class AllocationContext:
    """What an allocator sees: the groups, their unit scores, per-unit parameter costs, the budget, and
    (for measured allocators) calibration text and a loss probe."""

    model: torch.nn.Module
    groups: list[PruningGroup]
    scores: list[torch.Tensor]
    costs: list[int]
    budget: Budget
    round_to: int = 1
    seed: int = 0
    layers: torch.nn.ModuleList | None = None
    sample: Callable[[int, int], list[torch.Tensor]] | None = None  # (n_samples, seq_len) -> batches
    info: dict[str, Any] = field(default_factory=dict)  # allocators record what they measured (run.json)

    def feasible(self, i: int) -> list[int]:
        return feasible_counts(self.groups[i], self.round_to)

    def removed_params(self, counts: list[int]) -> int:
        return sum(c * cost for c, cost in zip(counts, self.costs))

    def ratio_counts(self, ratio: float, kinds: BlockKinds = ("attention", "mlp")) -> list[int]:
        counts = ratio_counts(self.groups, ratio, self.round_to)
        return [c if g.kind in kinds else 0 for c, g in zip(counts, self.groups)]

    def removal(self, i: int, count: int) -> torch.Tensor:
        """The ``count`` lowest-scored units of group ``i`` (GQA partitions honoured)."""
        return removal(self.groups[i], self.scores[i], count)

    def loss_probe(self, n_samples: int, seq_len: int) -> LossProbe:
        if self.sample is None or self.layers is None:
            raise UserError("allocation: this allocator measures the calibration loss and needs calibration text")
        return LossProbe(self.model, self.layers, self.sample(n_samples, seq_len))


class Allocator(Protocol):
    """What ``prunekit_register_allocators`` registers: a class with a nested pydantic ``Options``."""

    Options: type

    def __init__(self, options: Any) -> None: ...

    def allocate(self, ctx: AllocationContext) -> list[int]: ...


def check_counts(ctx: AllocationContext, counts: list[int], name: str) -> None:
    """A plugin's counts must be feasible for every group and within the budget."""
    if len(counts) != len(ctx.groups):
        raise RuntimeError(f"allocator {name!r} returned {len(counts)} counts for {len(ctx.groups)} groups")
    for i, (g, c) in enumerate(zip(ctx.groups, counts)):
        if c not in set(ctx.feasible(i)):
            raise RuntimeError(f"allocator {name!r}: {c} units is not a feasible removal for {g.name}")
    if ctx.removed_params(counts) > ctx.budget.params:
        raise RuntimeError(f"allocator {name!r} removed {ctx.removed_params(counts)} parameters, "
                           f"over the budget of {ctx.budget.params}")


def make_budget(groups: list[PruningGroup], costs: list[int], total: int, ratio: float,
                params_removed: float | None, round_to: int = 1) -> Budget:
    """A parameter fraction as given, or the per-layer ratio as the parameters it removes uniformly."""
    if params_removed is not None:
        return Budget(params=int(math.floor(params_removed * total)), total=total)
    counts = ratio_counts(groups, ratio, round_to)
    return Budget(params=sum(c * cost for c, cost in zip(counts, costs)), total=total, ratio=ratio)


def allocate(ctx: AllocationContext, name: str, allocator: Allocator) -> tuple[list[int], dict[str, Any]]:
    """Counts from ``allocator``, checked, and the record of what was asked and what was achieved."""
    counts = [int(c) for c in allocator.allocate(ctx)]
    check_counts(ctx, counts, name)
    removed = ctx.removed_params(counts)
    info = {
        "allocator": name,
        "options": allocator.options.model_dump(mode="json") if hasattr(allocator, "options") else {},
        "budget": {"ratio": ctx.budget.ratio, "params": ctx.budget.params,
                   "fraction": round(ctx.budget.fraction, 6)},
        "params_removed": removed,
        "params_removed_fraction": round(removed / ctx.budget.total, 6),
        "gap_params": ctx.budget.params - removed,
        "gap_fraction": round((ctx.budget.params - removed) / ctx.budget.total, 6),
        "counts": {g.name: c for g, c in zip(ctx.groups, counts)},
        **ctx.info,
    }
    return counts, info


def describe(info: dict[str, Any]) -> str:
    """One line for the terminal: budget, achieved fraction and the gap."""
    b = info["budget"]
    asked = f"ratio {b['ratio']} per layer = " if b["ratio"] is not None else ""
    return (f"allocation {info['allocator']}: budget {asked}{100 * b['fraction']:.2f} % of parameters; removed "
            f"{100 * info['params_removed_fraction']:.2f} % (gap {info['gap_params']:,} parameters)")


# ------------------------------------------------------------------------------ the pipeline's one call


def layers_mode(config, registry=None) -> str:
    """``allocation.layers`` as given, else the allocator's own ``default_layers`` (``measured``: all), else
    "default" (LLM-Pruner's range)."""
    if config.allocation.layers is not None:
        return config.allocation.layers
    if registry is None:
        from prunekit.registry import get_registry

        registry = get_registry()
    try:
        impl = registry.named("allocators", allocator_name(config)).impl
    except UserError:
        return "default"
    return getattr(impl, "default_layers", "default")


def pruned_layers(config, n_layers: int, registry=None) -> range:
    """Layers whose blocks become groups: explicit ``selection.layers``, every layer for
    ``allocation.layers: all`` (the allocator decides), else the LLM-Pruner default."""
    from prunekit.pipeline import resolve_layers

    if config.selection.layers is None and layers_mode(config, registry) == "all":
        return range(n_layers)
    return resolve_layers(n_layers, config.selection.layers)


def ratio_budget_layers(config, n_layers: int) -> range:
    """The layers a ``ratio`` budget is counted over: ``selection.layers`` or LLM-Pruner's default range, so
    ``--ratio 0.25`` names the same number of parameters whichever layers the allocator may then touch."""
    from prunekit.pipeline import resolve_layers

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
    from prunekit.registry import validate_options

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
        from prunekit.data import calibration_batches

        if ctx.tokenizer is None:
            if not batches:
                raise UserError("tokenizer: this allocator measures the calibration loss and needs a tokenizer")
            return batches_sample(batches, n_samples, seq_len)
        c = config.calibration
        seed = config.seed if c.seed is None else c.seed
        ids, _ = calibration_batches(ctx.tokenizer, source=c.source, n_samples=n_samples, seq_len=seq_len,
                                     seed=seed + 1)  # probe windows apart from the scoring sample
        return list(ids.split(8))

    actx = AllocationContext(model=ctx.model, groups=groups, scores=scores, costs=costs, budget=budget,
                             round_to=round_to, seed=config.seed, layers=ctx.adapter.layers(), sample=sample)
    counts, info = allocate(actx, name, entry.impl(options))
    info["provider"] = entry.provider
    return keep_from_counts(groups, scores, counts), info
