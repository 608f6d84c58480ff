"""Built-in allocators: ``uniform`` (LLM-Pruner's per-layer ratio), ``global`` (one ranking per block kind)
and ``measured`` (calibration-loss sensitivity per layer and block kind, then a knapsack for the budget).

Each receives a :class:`prunekit.allocation.base.AllocationContext` and returns how many units every group
loses; the core checks feasibility and the budget. See docs/allocation.md.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prunekit import hookimpl
from prunekit.allocation.base import AllocationContext
from prunekit.allocation.probe import LossProbe
from prunekit.core.budget import floor_feasible, search_ratio
from prunekit.core.select import global_counts

log = logging.getLogger("prunekit.allocation")
Kind = Literal["attention", "mlp"]


class KindsOptions(BaseModel):
    """Options every built-in allocator shares: which block kinds may lose units."""

    model_config = ConfigDict(extra="forbid")

    kinds: tuple[Kind, ...] = Field(default=("attention", "mlp"), min_length=1,
                                    description="block kinds that may lose units (e.g. [mlp]: MLP channels only)")

    @field_validator("kinds", mode="before")
    @classmethod
    def _split(cls, v):
        return tuple(x.strip() for x in v.split(",")) if isinstance(v, str) else v


class Uniform:
    """The same fraction of units in every pruned layer (LLM-Pruner's ratio); for a parameter budget,
    the largest such ratio whose removal fits."""

    Options = KindsOptions

    def __init__(self, options: KindsOptions):
        self.options = options

    def allocate(self, ctx: AllocationContext) -> list[int]:
        kinds = self.options.kinds
        if ctx.budget.ratio is not None and set(kinds) == {g.kind for g in ctx.groups}:
            return ctx.ratio_counts(ctx.budget.ratio, kinds)  # today's local ratio, exactly
        return search_ratio(lambda r: ctx.ratio_counts(r, kinds), ctx.removed_params, ctx.budget.params)


class GlobalOptions(KindsOptions):
    standardize: bool = Field(default=False, description="FLAP-style: z-score each group's unit scores before the "
                                                          "cross-layer ranking")


class Global:
    """One ranking of unit scores per block kind across all pruned layers, at the largest common ratio
    whose removal fits the budget (partitions floored, every group keeps a unit)."""

    Options = GlobalOptions

    def __init__(self, options: GlobalOptions):
        self.options = options

    def allocate(self, ctx: AllocationContext) -> list[int]:
        scores = ctx.scores
        if self.options.standardize:
            scores = [(s.double() - s.double().mean()) / (s.double().std() + 1e-12) for s in scores]
        kinds = self.options.kinds
        return search_ratio(lambda r: global_counts(ctx.groups, scores, r, kinds, ctx.round_to),
                            ctx.removed_params, ctx.budget.params)


class MeasuredOptions(KindsOptions):
    # defaults chosen on PTB validation (docs/results/allocators.md, allocation tuning)
    fractions: tuple[float, ...] = Field(default=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75), min_length=1,
                                         description="fractions of each group's units whose removal is measured")
    probe_samples: int = Field(default=4, ge=1, description="calibration windows of the loss probe")
    probe_seq_len: int = Field(default=128, ge=2, description="tokens per probe window")
    max_excess: float | None = Field(
        default=0.2, ge=0, description="cap every group at the fraction `uniform` would remove for the same "
                                        "budget plus this much (None: only the largest measured fraction caps)")

    search_steps: int = Field(default=40, ge=0, description="moves of a local search on the joint probe loss after "
                                                          "the knapsack (0: knapsack only); one partial forward each")
    search_samples: int | None = Field(default=None, ge=1, description="probe windows of the search (None: "
                                                                      "probe_samples)")
    search_step: float = Field(default=1 / 24, gt=0, lt=1, description="MLP units one move shifts, as a fraction "
                                                                     "of the width (attention: one head per KV group)")

    @field_validator("fractions")
    @classmethod
    def _in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < f < 1 for f in v):
            raise ValueError("fractions must lie in (0, 1)")
        return tuple(sorted(set(v)))


class Measured:
    """Measured sensitivity: the calibration-loss increase of removing each group's lowest-scored units
    at a few fractions (forward passes, no gradients), then the allocation minimising the summed increase
    for the budget: greedy by marginal loss per parameter over each group's lower convex hull."""

    Options = MeasuredOptions
    needs_calibration = True  # the loss probe reads calibration text (a tokenizer, or the run's batches)
    default_layers = "all"  # every layer is a candidate unless allocation.layers says otherwise

    def __init__(self, options: MeasuredOptions):
        self.options = options

    def levels(self, ctx: AllocationContext, i: int) -> list[int]:
        """Feasible counts nearest to each fraction of group ``i`` (distinct, non-zero)."""
        feasible = ctx.feasible(i)
        n = ctx.groups[i].n_units
        chosen = {min(feasible, key=lambda c: (abs(c - f * n), c)) for f in self.options.fractions}
        return sorted(c for c in chosen if c > 0)

    def curves(self, ctx: AllocationContext, limits: list[int] | None = None,
               probe: LossProbe | None = None) -> list[list[tuple[int, float]]]:
        """Per group, (units removed, calibration-loss increase) at 0 and at each measured level.

        ``limits``: the most units each group may lose (its cap); levels past the first one at or above the
        cap are not measured, since :func:`capped` reads nothing beyond it.
        """
        o = self.options
        probe = probe or ctx.loss_probe(o.probe_samples, o.probe_seq_len)
        curves: list[list[tuple[int, float]]] = []
        for i, g in enumerate(ctx.groups):
            points = [(0, 0.0)]
            if g.kind in o.kinds:
                for count in self.levels(ctx, i):
                    points.append((count, probe.loss({i: (g, ctx.removal(i, count))}) - probe.base))
                    if limits is not None and count >= limits[i]:
                        break
            curves.append(points)
            log.debug("measured %s: %s", g.name, points)
        ctx.info["measured"] = {"base_loss": round(probe.base, 6),
                                "loss_increase": {g.name: [[c, round(d, 6)] for c, d in pts[1:]]
                                                  for g, pts in zip(ctx.groups, curves)}}
        return curves

    def allocate(self, ctx: AllocationContext) -> list[int]:
        o = self.options
        probe = ctx.loss_probe(o.probe_samples, o.probe_seq_len)
        limits = caps(ctx, o.kinds, o.max_excess) if o.max_excess is not None else None
        curves = capped(ctx, self.curves(ctx, limits, probe), o.kinds, o.max_excess)
        counts = knapsack(ctx, curves)
        ctx.info["measured"]["predicted_increase"] = round(predicted(curves, counts), 6)
        same_text = o.search_samples in (None, o.probe_samples)
        return refine(ctx, counts, o, probe if same_text else None)


def caps(ctx: AllocationContext, kinds, max_excess: float | None) -> list[int]:
    """Most units each group may lose: uniform's count for this budget plus ``max_excess`` of its units
    (the largest feasible count when ``max_excess`` is None); 0 for groups of other kinds."""
    uniform = search_ratio(lambda r: ctx.ratio_counts(r, kinds), ctx.removed_params, ctx.budget.params)
    out = []
    for i, (g, base) in enumerate(zip(ctx.groups, uniform)):
        if g.kind not in kinds:
            out.append(0)
        elif max_excess is None:
            out.append(ctx.feasible(i)[-1])
        else:
            out.append(floor_feasible(g, int((base / g.n_units + max_excess) * g.n_units), ctx.round_to))
    return out


def refine(ctx: AllocationContext, counts: list[int], options: MeasuredOptions, probe=None) -> list[int]:
    """The knapsack's counts improved by ``options.search_steps`` moves of the joint-loss local search
    (:mod:`prunekit.allocation.search`); unchanged when ``search_steps`` is 0."""
    if not options.search_steps:
        return counts
    from prunekit.allocation.search import local_search

    if probe is None:
        probe = ctx.loss_probe(options.search_samples or options.probe_samples, options.probe_seq_len)
    eligible = [i for i, g in enumerate(ctx.groups) if g.kind in options.kinds]
    result = local_search(ctx, counts, probe, options.search_steps, caps(ctx, options.kinds, options.max_excess),
                          eligible, options.search_step)
    ctx.info.setdefault("measured", {})["search"] = result.record()
    return result.counts


def capped(ctx: AllocationContext, curves: list[list[tuple[int, float]]], kinds, max_excess: float | None):
    """Curves cut at each group's cap: the uniform allocation's fraction for this budget plus ``max_excess``
    (single-layer increases ignore interactions, so an uncapped knapsack piles removal on few layers)."""
    if max_excess is None:
        return curves
    uniform = search_ratio(lambda r: ctx.ratio_counts(r, kinds), ctx.removed_params, ctx.budget.params)
    out = []
    for i, (points, base) in enumerate(zip(curves, uniform)):
        n = ctx.groups[i].n_units
        cap = floor_feasible(ctx.groups[i], int((base / n + max_excess) * n), ctx.round_to)
        kept = [p for p in points if p[0] <= cap]
        beyond = [p for p in points if p[0] > cap]
        if beyond and kept[-1][0] < cap:
            (x0, y0), (x1, y1) = kept[-1], beyond[0]
            kept.append((cap, y0 + (y1 - y0) * (cap - x0) / (x1 - x0)))
        out.append(kept)
    return out


def lower_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Lower convex hull of (count, loss increase) points, from (0, 0) on."""
    hull: list[tuple[int, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # middle point on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def knapsack(ctx: AllocationContext, curves: list[list[tuple[int, float]]]) -> list[int]:
    """Greedy by marginal loss increase per removed parameter over each group's convex curve; the segment
    that no longer fits is taken in part (its largest feasible count within the budget)."""
    segments = []
    for i, points in enumerate(curves):
        hull = lower_hull(points)
        for (c0, d0), (c1, d1) in zip(hull, hull[1:]):
            slope = (d1 - d0) / ((c1 - c0) * ctx.costs[i])
            segments.append((slope, i, c0, c1))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    counts, closed = [0] * len(ctx.groups), set()
    left = ctx.budget.params
    for _, i, c0, c1 in segments:
        if i in closed or counts[i] != c0:
            continue
        extra = (c1 - c0) * ctx.costs[i]
        if extra <= left:
            counts[i], left = c1, left - extra
            continue
        partial = floor_feasible(ctx.groups[i], c0 + left // ctx.costs[i], ctx.round_to)
        if partial > c0:
            left -= (partial - c0) * ctx.costs[i]
            counts[i] = partial
        closed.add(i)
    return counts


def predicted(curves: list[list[tuple[int, float]]], counts: list[int]) -> float:
    """Summed loss increase the curves predict for ``counts`` (linear between measured points)."""
    return sum(_interp([p[0] for p in points], [p[1] for p in points], c) for points, c in zip(curves, counts))


def _interp(xs: list[int], ys: list[float], x: int) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


@hookimpl
def prunekit_register_allocators(register) -> None:
    register("uniform", Uniform)
    register("global", Global)
    register("measured", Measured)
