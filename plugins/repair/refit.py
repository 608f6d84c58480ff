"""Layer-wise ridge least-squares re-fit of the pruned output projections.

For every pruned output projection (``o_proj`` for heads, ``down_proj`` for MLP channels) the weight is
replaced by the ridge solution

    W = argmin ||X_p W^T - Y_d||² + λ ||W - W_0||²,   λ = ridge · mean(diag(X_pᵀX_p))

where ``X_p`` is the projection's input in the pruned model and ``Y_d`` the dense model's output of the same
projection on the same tokens, and ``W_0`` zero (``anchor="zero"``, the plain ridge) or the pruned weights
(``anchor="pruned"``, the default). ``inputs="sequential"`` takes ``X_p`` from the pruned model with
every earlier layer (and, inside a layer, the attention) already re-fitted, so each layer also corrects
the error that reaches it; ``inputs="dense"`` (the default) takes the dense inputs restricted to the kept
columns, ``X_d[:, kept]`` (each projection on its own, as if the rest of the model were dense).
Gram matrices are accumulated in float64 (per-batch products in float64 unless ``product_dtype`` says
float32) and solved with a Cholesky factorisation. With ``fit_bias`` an unpenalised intercept is fitted too
(this subsumes the bias compensation); otherwise an existing bias is kept and the weight fits ``Y_d - b``.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

from prunekit.builtin.repair.bias import bias_export_plan, make_bias_loadable
from prunekit.builtin.repair.layerwise import Stats, Target, ensure_bias, find_targets, normalize_which, walk


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, ridge: float, *, sum_x: torch.Tensor | None = None,
                sum_y: torch.Tensor | None = None, n: int | None = None,
                anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` minimising ||X W^T (+ 1 b^T) - Y||² + λ||W - W_0||² from the sums ``X^T X``, ``X^T Y`` (and, for
    an unpenalised intercept, ``sum X``, ``sum Y``, ``n``), with λ = ``ridge`` · mean(diag(X^T X)) and ``W_0`` =
    ``anchor`` [out, in] (None: zero, the plain ridge). ``W`` is [out, in], float64. Cholesky; a matrix that
    is not positive definite gets a growing diagonal jitter."""
    width = xtx.shape[0]
    lam = float(ridge) * float(xtx.diagonal().mean()) if width else 0.0
    if sum_x is not None:
        a = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=xtx.device)
        a[:width, :width], a[:width, width], a[width, :width], a[width, width] = xtx, sum_x, sum_x, float(n)
        rhs = torch.cat([xty, sum_y[None, :]], 0)
        penalty = torch.cat([torch.full((width,), lam, dtype=torch.float64, device=xtx.device),
                             torch.zeros(1, dtype=torch.float64, device=xtx.device)])
    else:
        a, rhs = xtx, xty
        penalty = torch.full((width,), lam, dtype=torch.float64, device=xtx.device)
    a = a + torch.diag(penalty)
    if anchor is not None:  # shrink towards W_0: the normal equations gain λ W_0^T on the right
        rhs = rhs.clone()
        rhs[:width] += lam * anchor.to(rhs.device, torch.float64).T
    jitter = 0.0
    scale = float(a.diagonal().abs().mean()) or 1.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(a + jitter * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
        if int(info) == 0:
            break
        jitter = scale * (1e-10 if jitter == 0 else jitter / scale * 100)
    else:
        raise RuntimeError("ridge system is not positive definite even with jitter")
    sol = torch.cholesky_solve(rhs, chol)  # [in(+1), out]
    if sum_x is not None:
        return sol[:width].T.contiguous(), sol[width].contiguous()
    return sol.T.contiguous(), None


def _fit_error(stats: Stats, w: torch.Tensor, b: torch.Tensor | None, fit_bias: bool) -> float:
    """||X W^T (+ b) - T||² over the calibration tokens, from the accumulated sums."""
    quad = float((w @ stats.xtx * w).sum()) - 2 * float((w * stats.xty.T).sum()) + stats.sq_t
    if fit_bias and b is not None:
        quad += 2 * float(b @ (w @ stats.sum_x)) - 2 * float(b @ stats.sum_y) + stats.n * float(b @ b)
    return quad


def _solver(ridge: float, fit_bias: bool, anchor: str):
    def solve(target: Target, linear: nn.Linear, stats: Stats) -> dict:
        w0 = linear.weight.detach() if anchor == "pruned" else None
        w, b = ridge_solve(stats.xtx, stats.xty, ridge, anchor=w0,
                           **({"sum_x": stats.sum_x, "sum_y": stats.sum_y, "n": stats.n} if fit_bias else {}))
        linear.weight.data.copy_(w.to(linear.weight.device, linear.weight.dtype))
        if b is not None:
            bias = ensure_bias(linear)
            bias.data.copy_(b.to(bias.device, bias.dtype))
        after = _fit_error(stats, w, b, fit_bias)  # error of the float64 solution (T = Y_d, or Y_d - b kept)
        return {"module": target.name, "width": linear.in_features, "tokens": stats.n,
                "rel_error_before": round(stats.rel_error(stats.sq_e), 6),
                "rel_error_after": round(stats.rel_error(after), 6)}
    return solve


def _minus_bias(linear: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    return y if linear.bias is None else y - linear.bias.detach().to(y.device, y.dtype)


def refit(pruned: nn.Module, dense: nn.Module, adapter: Any, batches: Sequence[torch.Tensor], *,
          ridge: float = 1.0, which: Sequence[str] = ("attention", "mlp"), inputs: str = "dense",
          columns: dict[str, torch.Tensor] | None = None, fit_bias: bool = False, scope: str = "pruned",
          loadable: bool = True, product_dtype: torch.dtype = torch.float64, anchor: str = "pruned") -> dict[str, Any]:
    """Re-fit the pruned output projections of ``pruned`` (in place) by layer-wise ridge least squares.

    ``dense``: an untouched copy of the model before pruning; ``adapter``: the pruned model's adapter; ``batches``:
    calibration token-id batches (LongTensor [batch, seq], no padding). ``ridge`` is relative to the mean diagonal
    of X_pᵀX_p. The defaults (``inputs="dense"``, ``anchor="pruned"``, ``ridge=1``) won on PTB validation on SmolLM2
    with PTB and with pd-books calibration (docs/repair.md). ``which``: block kinds (``attention`` = o_proj, ``mlp``
    = down_proj; the names ``o_proj``/``down_proj`` are accepted). ``inputs``: ``sequential`` (the pruned model's
    own inputs, earlier layers already re-fitted) or ``dense`` (``X_d[:, kept]``; needs ``columns``, see
    :func:`kept_columns`). ``fit_bias`` fits an intercept too (then ``loadable`` sets the config's bias flags, as
    :func:`bias_compensate` does). ``scope``: ``pruned`` (projections whose input width shrank) or ``all``.
    ``anchor``: what the ridge shrinks towards, ``zero`` (||W||², the plain ridge) or ``pruned`` (||W - W_pruned||²:
    a large ridge gives back the unrepaired weights instead of shrinking the output towards zero).
    ``product_dtype``: the per-batch Gram products (float64 by default; float32 is about twice as fast on CPUs and
    much faster on GPUs without fast float64, at cond(X)² · 6e-8 relative error before ridge).

    Returns the report for run.json: settings, tokens, seconds, and per layer the relative output error ||X W^T + b
    - Y_d|| / ||Y_d|| of each projection before and after the fit, on the inputs it was fitted on.
    """
    started = time.perf_counter()
    if ridge < 0:
        raise ValueError(f"ridge: {ridge} must be >= 0")
    if anchor not in ("zero", "pruned"):
        raise ValueError(f"anchor: {anchor!r}; accepted: zero, pruned")
    which = normalize_which(which)
    targets = find_targets(pruned, dense, adapter, which, columns, scope, need_columns=inputs == "dense")
    plan = {"flags": {}, "zero_biases": [], "unsupported": []}
    if fit_bias and loadable and targets:
        plan = bias_export_plan(pruned, [t.name for t in targets])
        if plan["unsupported"]:
            make_bias_loadable(pruned, [t.name for t in targets], plan)  # raises before any change
    layers = walk(pruned, dense, adapter, batches, targets, _solver(ridge, fit_bias, anchor), inputs=inputs, gram=True,
                  product_dtype=product_dtype, fit_target=None if fit_bias else _minus_bias)
    if fit_bias and loadable and targets:
        make_bias_loadable(pruned, [t.name for t in targets], plan)
    return {"method": "refit", "inputs": inputs, "ridge": ridge, "anchor": anchor, "fit_bias": fit_bias,
            "product_dtype": str(product_dtype).removeprefix("torch."), "which": list(which),
            "scope": scope, "tokens": int(sum(b.numel() for b in batches)), "projections": len(targets),
            "config_flags": plan["flags"], "seconds": round(time.perf_counter() - started, 3), "layers": layers}
