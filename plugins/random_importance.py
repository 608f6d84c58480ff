"""``random``: seeded random unit scores, the floor every real method must beat."""

from __future__ import annotations

import torch

from prunekit import hookimpl
from prunekit.importance.base import Importance, ScoringContext


class Random(Importance):
    """Uniform random unit scores from the run seed (same seed, same mask)."""

    def scores(self, ctx: ScoringContext) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(ctx.seed)
        return [torch.rand(g.n_units, generator=gen) for g in ctx.groups]


@hookimpl
def prunekit_register_importances(register) -> None:
    register("random", Random)
