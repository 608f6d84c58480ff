"""The importance-method interface every method plugin implements, and helpers they share.

A method turns a model and its pruning groups into one score per unit (higher = keep). Most methods
only supply a per-weight *salience* (|w|, |w*g|, |w*delta|, ...); the shared reduction in
:func:`prunekit.core.groups.unit_scores` turns it into unit scores, so methods differ in their signal and
nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict

from prunekit.core.groups import PruningGroup, prunable_param_names, unit_scores
from prunekit.importance.activations import ActivationStats, collect_activation_stats
from prunekit.runtime.progress import track


class Options(BaseModel):
    """Base for method options: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    reduction: Literal["sum", "mean", "max"] = "sum"


@dataclass
class ScoringContext:
    """What a method sees: the model (in its scoring dtype), its groups, calibration batches and the run seed."""

    model: torch.nn.Module
    groups: list[PruningGroup]
    batches: list[torch.Tensor]  # each LongTensor [batch, seq_len] of input ids
    seed: int = 0
    info: dict = field(default_factory=dict)  # methods record effective settings here (goes to run.json)
    # draw k -> (fresh seeded calibration batches, their provenance); k = 0 is ``batches`` itself.
    sampler: Callable[[int], tuple[list[torch.Tensor], dict]] | None = None
    _activation_cache: dict | None = field(default=None, init=False, repr=False)

    def params(self) -> dict[str, torch.nn.Parameter]:
        """The prunable weights by name (the ones some group slices)."""
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in prunable_param_names(self.groups)}

    def activation_stats(self) -> dict[str, ActivationStats]:
        """Input statistics (Σx², Σx, mean, variance per input channel over all calibration tokens) of every
        prunable Linear, by module name; one forward pass over ``batches`` the first time, cached after."""
        if self._activation_cache is None:
            names = list(dict.fromkeys(s.module_name for g in self.groups for s in g.slices))
            self._activation_cache = collect_activation_stats(self.model, names, self.batches)
        return self._activation_cache

    def batch_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of one calibration batch."""
        from prunekit.runtime.devices import input_device

        batch = batch.to(input_device(self.model))  # accelerate's first device when the model is dispatched
        out = self.model(input_ids=batch, labels=batch, use_cache=False)
        # Hugging Face upcasts the logits itself; a model that does not gets it here
        if out.loss.dtype != torch.float32:
            logits = out.logits[:, :-1].float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        return out.loss

    def iter_losses(self, batches: list[torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
        """Loss of each calibration batch weighted by its share of the sequences, so the losses sum to the
        mean over all sequences whatever the batch split (batches are micro-batches: same gradient, less memory).
        ``batches`` defaults to the context's own sample."""
        batches = self.batches if batches is None else batches
        total = sum(batch.shape[0] for batch in batches)
        for batch in track(batches, "gradient pass"):
            yield self.batch_loss(batch) * (batch.shape[0] / total)

    def draw_batches(self, draw: int) -> list[torch.Tensor]:
        """Calibration sample number ``draw``: 0 is ``batches``, k >= 1 a fresh seeded sample from ``sampler``
        (its provenance is appended to ``info["calibration_draws"]``, so run.json says what was used)."""
        if draw == 0:
            return self.batches
        if self.sampler is None:
            raise ValueError("this method asks for fresh calibration samples, but the scoring context has no sampler")
        batches, provenance = self.sampler(draw)
        self.info.setdefault("calibration_draws", []).append({"draw": draw, **provenance})
        return batches


class Importance:
    """Base class of importance methods. Subclasses set ``Options`` and implement :meth:`salience`."""

    Options: ClassVar[type[Options]] = Options
    needs_calibration: ClassVar[bool] = False
    signed: ClassVar[bool] = False  # True: salience is signed, channel scores are |sum| (vector-wise)

    def __init__(self, options: Options):
        self.options = options

    def requires_calibration(self) -> bool:
        """Whether scoring with these options reads ``ctx.batches``; override when it depends on the options."""
        return bool(self.needs_calibration)

    def salience(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Per-weight salience for every prunable weight (same shape as the weight)."""
        raise NotImplementedError

    def scores(self, ctx: ScoringContext) -> list[torch.Tensor]:
        """One float32 score per unit of every group; override only to bypass the shared reduction."""
        return unit_scores(ctx.groups, self.salience(ctx), self.options.reduction, signed=self.signed)


def accumulate_gradients(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """float32 gradient of the mean calibration loss for every prunable weight (one pass per batch).

    The forward/backward runs in the model's dtype; each weight's gradient is added into its float32
    buffer as soon as autograd produces it (:class:`prunekit.importance.precision.GradAccumulator`). float16 models
    are loss-scaled; an overflow redoes the pass at half the scale.
    """
    from prunekit.importance.precision import GradAccumulator, GradientOverflow, LossScale, refuse_silent_underflow

    params = ctx.params()
    scale = LossScale.for_params(params.values())
    for name, p in ctx.model.named_parameters():
        p.requires_grad_(name in params)
        p.grad = None
    while True:
        with GradAccumulator(params, scale) as acc:
            try:
                # drive the generator to its end (observers count batches)
                for index, loss in enumerate(ctx.iter_losses()):
                    if not torch.isfinite(loss):
                        from prunekit.importance.finite import nonfinite_loss

                        raise nonfinite_loss(ctx.model, ctx.batches[index], f"calibration loss at batch {index + 1} of "
                                             f"{len(ctx.batches)}")
                    scale.backward(loss)
                    acc.check_overflow()
            except GradientOverflow:
                scale.backoff()
                continue
            grads = acc.result()
        break
    for name, g in grads.items():
        check_finite(g, name)
    refuse_silent_underflow(grads, scale)
    _record_scale(ctx, scale)
    return grads


def fisher_diagonal(ctx: ScoringContext,
                    with_mean: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean gradient (empty unless ``with_mean``) and empirical Fisher diagonal (mean of squared per-sample
    gradients), both float32 per prunable weight, on the weight's device.

    One forward and backward per calibration *sequence*: the square must be taken per sample, so the
    micro-batching of ``iter_losses`` (which only changes memory) cannot be used here. Each per-sample
    gradient is squared into the float32 sums inside the backward (a post-accumulate-grad hook) and freed.
    """
    from prunekit.importance.precision import GradAccumulator, GradientOverflow, LossScale, refuse_silent_underflow

    params = ctx.params()
    for name, p in ctx.model.named_parameters():
        p.requires_grad_(name in params)
        p.grad = None
    samples = [row.unsqueeze(0) for batch in ctx.batches for row in batch]
    scale = LossScale.for_params(params.values())
    while True:
        grad = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if with_mean else {}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

        def add(n: str, g: torch.Tensor) -> None:
            check_finite(g, n)
            if with_mean:
                grad[n].add_(g, alpha=1 / len(samples))
            fisher[n].addcmul_(g, g, value=1 / len(samples))

        try:
            with GradAccumulator(params, scale, on_grad=add) as acc:
                for sample in track(samples, "per-sample gradients"):
                    loss = ctx.batch_loss(sample)
                    check_finite(loss, "loss")
                    scale.backward(loss)
                    acc.check_overflow()
        except GradientOverflow:
            scale.backoff()
            continue
        break
    refuse_silent_underflow(fisher, scale)
    _record_scale(ctx, scale)
    return grad, fisher


def _record_scale(ctx: ScoringContext, scale) -> None:
    """float16 loss scaling goes to the method's info (run.json)."""
    if scale.enabled:
        ctx.info["loss_scale"] = scale.describe()


def check_finite(t: torch.Tensor, what: str, step: int | None = None) -> None:
    """Stop with a clear error when a loss or gradient holds NaN/Inf.

    Tests the sum, which NaN and Inf always reach: one reduction instead of a boolean copy of the tensor
    (25x cheaper on CPU). Finite values summing past 3e38 also trip it; such a gradient is broken too.
    """
    if not torch.isfinite(t.sum()):
        where = f" at iteration {step}" if step is not None else ""
        raise FloatingPointError(f"non-finite values in {what}{where}")
