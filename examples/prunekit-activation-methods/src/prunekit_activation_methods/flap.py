"""``flap``: FLAP's fluctuation metric with bias compensation (An et al., AAAI 2024).

Score of input channel j of an output projection (``o_proj`` columns of a head, ``down_proj`` columns of
an MLP channel): Var(X_j)·‖W_{:,j}‖², the variance of that channel's input over the calibration tokens
times the squared norm of the weight column it multiplies. A unit sums its channels. With
``standardize`` the scores of each group are standardised, as FLAP does before comparing layers
(unchanged ranking inside a group, comparable scales under ``selection.scope: global``).

Bias compensation: a removed channel's average contribution, W_{:,R}·mean(X_R), is added to the
projection's output bias after pruning. The per-unit contributions are computed while scoring (on the
unpruned weights) and applied from the ``prunekit_after_pruning`` hook once the kept units are known.
LLaMA projections have no bias: prunekit's ``make_bias_loadable`` sets the config flags the model family reads
(LLaMA: ``attention_bias`` / ``mlp_bias``) and gives every projection those flags govern a bias (zeros where
nothing was compensated), so the checkpoint reloads with plain ``from_pretrained``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from prunekit import hookimpl
from prunekit.errors import UserError
from prunekit.importance.base import Importance, Options, ScoringContext

# model -> {group name: (module name, per-unit contribution [n_units, out_features])}, until pruning
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FlapOptions(Options):
    standardize: bool = True
    compensate: bool = True


class Flap(Importance):
    """FLAP fluctuation: activation variance × weight-column norm² of the output projection, bias-compensated."""

    Options = FlapOptions
    needs_calibration = True

    def scores(self, ctx: ScoringContext) -> list[torch.Tensor]:
        stats = ctx.activation_stats()
        scores, pending = [], {}
        for group in ctx.groups:
            inputs = [s for s in group.slices if s.dim == 1]
            if not inputs:
                raise ValueError(f"flap scores the input columns of an output projection; {group.name} has none")
            score = torch.zeros(group.n_units, dtype=torch.float64)
            for s in inputs:
                w = ctx.model.get_submodule(s.module_name).weight.detach().double().cpu()
                st = stats[s.module_name]
                score += (st.variance * w.square().sum(0))[s.channels].sum(1)
                if self.options.compensate:
                    contrib = (w * st.mean[None, :])[:, s.channels].sum(-1).T  # [n_units, out_features]
                    pending[group.name] = (s.module_name, contrib.float())
            if self.options.standardize and group.n_units > 1:
                score = (score - score.mean()) / score.std().clamp_min(1e-12)
            scores.append(score.float())
        if pending:
            _PENDING[ctx.model] = pending
        ctx.info["flap"] = {"standardize": self.options.standardize, "compensate": self.options.compensate,
                            "compensation": "output bias of o_proj/down_proj (config attention_bias/mlp_bias)"
                            if self.options.compensate else None}
        return scores


def compensate(model: torch.nn.Module, adapter: Any, groups: list, kept: list[torch.Tensor],
               pending: dict[str, tuple[str, torch.Tensor]]) -> list[str]:
    """Add each removed unit's mean contribution to its projection's bias; returns the block kinds compensated.

    ``make_bias_loadable`` (prunekit's ``bias`` repair) first sets the config flags this model family reads and gives
    every projection they govern a bias (zeros where nothing is compensated), so the saved checkpoint reloads;
    a family with no such flag is refused before anything changes.
    """
    from prunekit.builtin.repair import make_bias_loadable

    todo = []
    for group, keep in zip(groups, kept):
        if group.name not in pending:
            continue
        removed = torch.ones(group.n_units, dtype=torch.bool)
        removed[keep] = False
        if removed.any():
            todo.append((group.kind, *pending[group.name], removed))
    if not todo:
        return []
    try:
        make_bias_loadable(model, sorted({name for _, name, _, _ in todo}))
    except ValueError as exc:
        raise UserError(f"flap: compensate: {exc}; use compensate: false for this model family") from None
    with torch.no_grad():
        for _, module_name, contrib, removed in todo:
            linear = model.get_submodule(module_name)
            linear.bias.add_(contrib[removed].sum(0).to(linear.weight))
    return sorted({kind for kind, _, _, _ in todo})


@hookimpl
def prunekit_after_pruning(context: Any, model: torch.nn.Module) -> None:
    pending = _PENDING.pop(model, None)
    if pending is not None:
        compensate(model, context.adapter, context.groups, context.kept, pending)


@hookimpl
def prunekit_register_importances(register) -> None:
    register("flap", Flap)
