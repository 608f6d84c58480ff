"""FLAP-style bias compensation of pruned output projections, and what makes the added biases loadable.

For an output projection ``y = x W^T + b`` whose input columns ``R`` were removed, FLAP (An et al., AAAI
2024) adds the removed columns' mean contribution to the bias::

    b_new = b + W_dense[:, R] · mean(X_dense[:, R])

so the projection's mean output over the calibration tokens, on the dense model's inputs, is unchanged.
:func:`bias_compensate` computes it in the equivalent form that also holds after the kept weights have
changed (LoRA, a re-fit): ``b_new = b + mean(Y_dense) - mean(Y_pruned)``, where ``Y_pruned`` is the pruned
projection applied to ``X_dense[:, kept]`` (``inputs="dense"``, FLAP) or to the pruned model's own inputs
with every earlier layer already compensated (``inputs="sequential"``). With the kept weights untouched the
dense form is exactly FLAP's formula.

LLaMA's ``o_proj``/``down_proj`` have no bias. :func:`bias_export_plan` finds, from the model's own
transformers class (built on the ``meta`` device, no model type is named), which boolean ``*_bias`` config
flags give those projections a bias, and which other projections the same flags give one;
:func:`make_bias_loadable` sets the flags and gives those other projections zero biases (exact: they add
nothing), so ``from_pretrained`` and ``prunekit.load_pruned`` rebuild exactly the saved modules.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
from torch import nn

from prunekit.builtin.repair.layerwise import Stats, Target, ensure_bias, find_targets, normalize_which, walk


def _biased_linears(model_cls: type, config: Any) -> set[str]:
    with torch.device("meta"):
        reference = model_cls(config)
    return {name for name, m in reference.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def bias_export_plan(model: nn.Module, modules: Sequence[str]) -> dict[str, Any]:
    """How a checkpoint of ``model`` can carry biases on ``modules``: ``{"flags": {name: True},
    "zero_biases": [other modules those flags give a bias], "unsupported": [modules no flag covers]}``.

    Probes the transformers class the model is built on (``prunekit.remote_code.transformers_class``), on the
    ``meta`` device: first which Linear layers have a bias with the current config, then which ones each
    boolean ``*_bias`` config flag adds. Flags are chosen greedily to cover ``modules``.
    """
    from prunekit.adapters.hf import transformers_class

    cls = transformers_class(type(model))
    config = copy.deepcopy(model.config)
    have = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    base = _biased_linears(cls, config)
    needed = {m for m in modules if m not in base}
    plan: dict[str, Any] = {"flags": {}, "zero_biases": [], "unsupported": []}
    if not needed:
        return plan
    flags = {k: v for k, v in config.to_dict().items() if k.endswith("bias") and isinstance(v, bool) and not v}
    gains: dict[str, set[str]] = {}
    for flag in flags:
        trial = copy.deepcopy(config)
        setattr(trial, flag, True)
        try:
            gains[flag] = _biased_linears(cls, trial) - base
        except Exception:  # a flag the class cannot build with: not a route
            continue
    covered: set[str] = set()
    added: set[str] = set()
    while needed - covered:
        flag = max(gains, key=lambda f: len(gains[f] & (needed - covered)), default=None)
        if flag is None or not gains[flag] & (needed - covered):
            break
        plan["flags"][flag] = True
        covered |= gains[flag]
        added |= gains.pop(flag)
    plan["unsupported"] = sorted(needed - covered)
    plan["zero_biases"] = sorted(added - set(modules) - have)
    return plan


def make_bias_loadable(model: nn.Module, modules: Sequence[str], plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set the config flags of :func:`bias_export_plan` and give every projection they govern a bias (zeros
    where none was computed), so the saved checkpoint matches what its config builds. Returns the plan;
    raises ``ValueError`` (before changing anything) when some module cannot get a bias from the config."""
    plan = plan or bias_export_plan(model, modules)
    if plan["unsupported"]:
        raise ValueError(f"no config flag of {type(model).__name__} gives {plan['unsupported'][0]} a bias "
                         f"({len(plan['unsupported'])} modules): a checkpoint could not reload it; "
                         f"pass loadable=False to compensate in memory only")
    for flag, value in plan["flags"].items():
        setattr(model.config, flag, value)
    for name in list(modules) + plan["zero_biases"]:
        ensure_bias(model.get_submodule(name))
    return plan


def flap_bias(dense_weight: torch.Tensor, mean_input: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation for one projection: ``W_dense[:, removed] · mean(X_dense[:, removed])`` (float64),
    from the dense weight [out, in], the mean of its inputs over the calibration tokens [in] and the kept
    input columns. What :func:`bias_compensate` adds with ``inputs="dense"`` when the kept weights are the
    dense ones; for callers that already hold the input means (the FLAP method scores with them)."""
    removed = torch.ones(dense_weight.shape[1], dtype=torch.bool, device=dense_weight.device)
    removed[kept.to(dense_weight.device)] = False
    return dense_weight.double()[:, removed] @ mean_input.double().to(dense_weight.device)[removed]


def _solve_bias(target: Target, linear: nn.Linear, stats: Stats) -> dict:
    """b += mean(Y_dense) - mean(Y_current); the squared error falls by n·||mean error||²."""
    shift = (stats.sum_y - stats.sum_p) / stats.n
    bias = ensure_bias(linear)
    bias.data += shift.to(bias.device, bias.dtype)
    after = stats.sq_e - stats.n * float(shift.square().sum())
    return {"module": target.name, "width": linear.in_features, "tokens": stats.n,
            "rel_error_before": round(stats.rel_error(stats.sq_e), 6),
            "rel_error_after": round(stats.rel_error(after), 6),
            "bias_norm": round(float(bias.detach().float().norm()), 6)}


def bias_compensate(pruned: nn.Module, dense: nn.Module, adapter: Any, batches: Sequence[torch.Tensor], *,
                    columns: dict[str, torch.Tensor] | None = None, inputs: str = "dense",
                    which: Sequence[str] = ("attention", "mlp"), scope: str = "pruned",
                    loadable: bool = True) -> dict[str, Any]:
    """Add FLAP's bias compensation to the pruned output projections of ``pruned`` (in place).

    ``dense`` is an untouched copy of the model before pruning; ``adapter`` the pruned model's adapter;
    ``batches`` calibration token-id batches (LongTensor [batch, seq], no padding). ``columns`` maps each
    pruned projection to its surviving dense input columns (:func:`kept_columns`); it is required for
    ``inputs="dense"`` (FLAP: the dense model's inputs), not for ``"sequential"`` (the pruned model's own
    inputs, earlier layers already compensated). ``which``: block kinds (``attention`` = o_proj, ``mlp`` =
    down_proj); ``scope``: ``pruned`` (projections whose input width shrank) or ``all``. ``loadable`` sets the
    config's bias flags and zero biases so the checkpoint reloads (:func:`make_bias_loadable`).

    Returns the report for run.json: settings, tokens, seconds, the config flags set, and per layer the
    relative output error ||Y - Y_dense|| / ||Y_dense|| of each projection before and after.
    """
    started = time.perf_counter()
    which = normalize_which(which)
    targets = find_targets(pruned, dense, adapter, which, columns, scope, need_columns=inputs == "dense")
    plan = {"flags": {}, "zero_biases": [], "unsupported": []}
    if loadable and targets:
        plan = bias_export_plan(pruned, [t.name for t in targets])
        if plan["unsupported"]:
            make_bias_loadable(pruned, [t.name for t in targets], plan)  # raises before any change
    layers = walk(pruned, dense, adapter, batches, targets, _solve_bias, inputs=inputs, gram=False)
    if loadable and targets:
        make_bias_loadable(pruned, [t.name for t in targets], plan)
    return {"method": "bias", "inputs": inputs, "which": list(which), "scope": scope,
            "tokens": int(sum(b.numel() for b in batches)), "projections": len(targets),
            "config_flags": plan["flags"], "zero_biases": len(plan["zero_biases"]),
            "seconds": round(time.perf_counter() - started, 3), "layers": layers}
