"""``magnitude``: data-free importance |w|^p, reduced over the shared pruning groups."""

from __future__ import annotations

from typing import Literal

import torch

from prunekit import hookimpl
from prunekit.importance.base import Importance, Options, ScoringContext


class MagnitudeOptions(Options):
    p: Literal[1, 2] = 2


class Magnitude(Importance):
    """Weight magnitude |w|^p summed over each unit's coupled rows and columns."""

    Options = MagnitudeOptions

    def salience(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        return {n: w.detach().float().abs().pow(self.options.p) for n, w in ctx.params().items()}


@hookimpl
def prunekit_register_importances(register) -> None:
    register("magnitude", Magnitude)
