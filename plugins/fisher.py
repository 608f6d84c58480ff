"""``fisher``: second-order (OBD) importance ½·w²·F with F the diagonal empirical Fisher from per-sample gradients.

Optimal Brain Damage estimates the loss increase of zeroing a weight at a minimum as ½·h·w², h the
Hessian diagonal; the empirical Fisher F = mean over calibration sequences of the squared per-sequence
gradient stands in for h. Unlike first-order Taylor |w·g| it does not vanish where the mean gradient
happens to cancel, and it is non-negative per weight, so the shared reduction sums it per unit as is.
LLM-Pruner's mixed form |w·g − ½·w²·F| stays available as ``taylor -o variant=second``.

Cost: one forward and backward per calibration sequence (first-order Taylor batches them), and one
float32 accumulator per prunable weight.
"""

from __future__ import annotations

import torch

from prunekit import hookimpl
from prunekit.importance.base import Importance, Options, ScoringContext, fisher_diagonal


class FisherOptions(Options):
    """No knobs beyond the shared reduction: the calibration size is the run's ``calibration.n_samples``."""


class Fisher(Importance):
    """OBD salience ½·w²·F per weight, F the mean squared per-sequence gradient."""

    Options = FisherOptions
    needs_calibration = True

    def salience(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        _, fisher = fisher_diagonal(ctx, with_mean=False)
        ctx.info["fisher"] = {"samples": sum(int(b.shape[0]) for b in ctx.batches),
                              "passes": "one forward+backward per calibration sequence"}
        return {n: fisher.pop(n).mul_(w.detach().float().square()).mul_(0.5) for n, w in ctx.params().items()}


@hookimpl
def prunekit_register_importances(register) -> None:
    register("fisher", Fisher, description="second-order (OBD) salience 0.5*w^2*F, F the diagonal empirical "
                                           "Fisher from per-sample gradients")
