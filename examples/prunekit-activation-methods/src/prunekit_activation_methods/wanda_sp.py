"""``wanda-sp``: structured Wanda, |W|·‖X‖ per weight reduced per unit (An et al. 2024's Wanda-sp baseline)."""

from __future__ import annotations

import torch

from prunekit import hookimpl
from prunekit.importance.base import Importance, Options, ScoringContext


class WandaSP(Importance):
    """Structured Wanda: |W|·‖X‖ (input-channel activation norm) summed over each unit's coupled weights."""

    Options = Options
    needs_calibration = True

    def salience(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        stats = ctx.activation_stats()
        out = {}
        for name, w in ctx.params().items():
            module = name.removesuffix(".weight")
            out[name] = w.detach().float().abs() * stats[module].norm.float().to(w.device)[None, :]
        ctx.info["wanda_sp"] = {"tokens": next(iter(stats.values())).count}
        return out


@hookimpl
def prunekit_register_importances(register) -> None:
    register("wanda-sp", WandaSP)
