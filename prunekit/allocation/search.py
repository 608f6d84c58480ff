"""Local search over whole allocations on the joint calibration loss (EvoPress-style).

The measured allocator's knapsack adds single-group loss increases, which ignores interactions between
layers. This search starts from an allocation and moves budget between groups: a move takes one step of
units from a donor group and gives the freed parameters to a receiver group; it is kept when the loss
of the model with *all* removals applied at once (zeroed, not pruned) drops. Each candidate is one partial
forward pass over the probe tokens, from the earlier of the two changed layers; a kept move's layer inputs are
adopted from that pass.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from prunekit.allocation.base import AllocationContext
from prunekit.allocation.probe import LossProbe
from prunekit.core.budget import floor_feasible

log = logging.getLogger("prunekit.allocation")


@dataclass(frozen=True)
class SearchResult:
    """The searched counts and what the search did (recorded in run.json)."""

    counts: list[int]
    start_loss: float
    loss: float
    steps: int
    accepted: int

    def record(self) -> dict:
        return {"start_loss": round(self.start_loss, 6), "loss": round(self.loss, 6), "steps": self.steps,
                "accepted": self.accepted}


def step_of(ctx: AllocationContext, i: int, step_fraction: float) -> int:
    """Units group ``i`` gives up in one move: the smallest feasible non-zero count for partitioned
    groups (one head per KV group), else the feasible count nearest ``step_fraction`` of its units."""
    feasible = [c for c in ctx.feasible(i) if c > 0]
    if not feasible:
        return 0
    if ctx.groups[i].partition is not None:
        return feasible[0]
    target = step_fraction * ctx.groups[i].n_units
    return min(feasible, key=lambda c: (abs(c - target), c))


def local_search(ctx: AllocationContext, counts: list[int], probe: LossProbe, steps: int, caps: list[int],
                 eligible: list[int], step_fraction: float = 1 / 24) -> SearchResult:
    """Improve ``counts`` by ``steps`` proposed moves (donor → receiver), keeping the moves that lower the
    joint probe loss. Receivers stay at or below ``caps``; the total stays within the budget. Deterministic
    for a given ``ctx.seed``."""
    counts = list(counts)
    rng = random.Random(ctx.seed)
    step = {i: step_of(ctx, i, step_fraction) for i in eligible}

    def removed_of(cs: list[int]) -> dict:
        return {i: (ctx.groups[i], ctx.removal(i, c)) for i, c in enumerate(cs) if c > 0}

    best = start = probe.rebase(removed_of(counts))
    accepted = tried = 0
    attempts = 0
    while tried < steps and attempts < 50 * max(steps, 1) and len(eligible) > 1:
        attempts += 1
        i, j = rng.sample(eligible, 2)
        if counts[i] == 0 or counts[j] >= caps[j]:
            continue
        new_i = floor_feasible(ctx.groups[i], max(0, counts[i] - step[i]), ctx.round_to)
        freed = (counts[i] - new_i) * ctx.costs[i]
        left = ctx.budget.params - ctx.removed_params(counts) + freed
        new_j = floor_feasible(ctx.groups[j], min(caps[j], counts[j] + left // ctx.costs[j]), ctx.round_to)
        cand = list(counts)
        cand[i], cand[j] = new_i, new_j
        if new_j <= counts[j] or ctx.removed_params(cand) < ctx.removed_params(counts):
            continue  # a move never gives budget back: allocations compared at (at least) equal removal
        tried += 1
        start_layer = min(ctx.groups[i].layer, ctx.groups[j].layer)
        loss = probe.loss(removed_of(cand), start=start_layer, remember=True)
        if loss < best:
            counts, accepted = cand, accepted + 1
            # the candidate's pass already computed the layer inputs a re-record would (layers < start unchanged)
            best = loss if probe.adopt() else probe.rebase(removed_of(counts))
            log.debug("search step %d: %s -> %s, loss %.5f", tried, ctx.groups[i].name, ctx.groups[j].name, best)
    return SearchResult(counts=counts, start_loss=start, loss=best, steps=tried, accepted=accepted)
