"""``taylor``: gradient importance of LLM-Pruner, first-order, second-order or vector-wise.

- ``first``: per-weight |w*g| summed per unit (element-wise first-order Taylor).
- ``second``: |w*g - 0.5*w^2*F| with F the Fisher diagonal from per-sample gradients (LLM-Pruner's
  ``param_mix``; the pure second-order term 0.5*w^2*F is the separate ``fisher`` method).
- ``vector``: |sum over a channel of w*g| (vector-wise first-order Taylor).
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit import hookimpl
from prunekit.importance.base import Importance, Options, ScoringContext, accumulate_gradients, fisher_diagonal


class TaylorOptions(Options):
    variant: Literal["first", "second", "vector"] = "first"


class Taylor(Importance):
    """Taylor expansion of the calibration loss around the current weights (LLM-Pruner)."""

    Options = TaylorOptions
    needs_calibration = True

    @property
    def signed(self) -> bool:  # type: ignore[override]
        return self.options.variant == "vector"

    def salience(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        params = ctx.params()
        # Computed in place in the float32 gradient buffers, one weight at a time: no second float32 copy.
        if self.options.variant == "second":
            grad, fisher = fisher_diagonal(ctx)
            out = {}
            for n, w in params.items():
                second = fisher.pop(n).mul_(w.detach().float().square()).mul_(0.5)
                out[n] = grad.pop(n).mul_(w.detach()).sub_(second).abs_()
            return out
        grad = accumulate_gradients(ctx)
        product = {n: grad.pop(n).mul_(w.detach()) for n, w in params.items()}
        return product if self.options.variant == "vector" else {n: t.abs_() for n, t in product.items()}


@hookimpl
def prunekit_register_importances(register) -> None:
    register("taylor", Taylor)
