"""Scoring precision: the dtype a model is scored in, float32 gradient accumulators, float16 loss scaling.

The model is scored in its own load dtype by default (no float32 copy of a bf16/fp16 model: a 70B model
has no room for one). The forward and backward run in that dtype with a float32 loss (Hugging Face
upcasts the logits for the cross-entropy); what needs precision is summed in float32 *per prunable
weight*: :class:`GradAccumulator` adds every low-precision ``.grad`` into its weight's float32 buffer
the moment autograd has produced it (``register_post_accumulate_grad_hook``) and frees it at once, so at
most one low-precision gradient of one weight exists at a time. float16 gradients underflow (its
smallest subnormal is 6e-8): :class:`LossScale` scales the loss, detects inf/NaN gradients and makes the
caller redo the pass at half the scale, unscaling into the float32 buffers. See docs/precision.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch

from prunekit.errors import UserError

# config / API names -> dtype; "model" (None) scores in the model's own dtype, "float32" casts it up for
# scoring and restores it bit for bit (float32 holds every bf16/fp16 value exactly).
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"model": None, "float32": torch.float32,
                                                  "bfloat16": torch.bfloat16, "float16": torch.float16}
INITIAL_LOSS_SCALE = 2.0 ** 16  # torch.amp.GradScaler's default
MIN_LOSS_SCALE = 1.0


def resolve_compute_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A compute dtype from a dtype, a name (``model``, ``float32``, ``bfloat16``, ``float16``) or None (model's)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value]
    raise UserError(f"compute_dtype: {value!r} is not supported (accepted: {', '.join(COMPUTE_DTYPES)})")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class GradientOverflow(FloatingPointError):
    """A loss-scaled float16 backward produced inf/NaN gradients: redo the pass at a smaller scale."""


class LossScale:
    """Dynamic loss scaling for float16 backward passes (identity for float32 and bfloat16).

    The loss is multiplied by ``value`` before ``backward`` so small gradients stay above float16's
    underflow; gradients are divided by it (a power of two: exact) when they enter the float32 buffers.
    On inf/NaN gradients the caller calls :meth:`backoff` (halve) and redoes its pass from zeroed buffers.
    """

    def __init__(self, enabled: bool, initial: float | None = None):
        self.enabled = enabled
        self.value = (INITIAL_LOSS_SCALE if initial is None else initial) if enabled else 1.0
        self.initial = self.value
        self.backoffs = 0

    @classmethod
    def for_params(cls, params: Iterable[torch.Tensor]) -> "LossScale":
        """Enabled when some parameter is float16."""
        return cls(any(p.dtype == torch.float16 for p in params))

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled when enabled."""
        (loss * self.value if self.enabled else loss).backward()

    def backoff(self) -> None:
        """Halve the scale after an overflow; refuse once it would fall below 1 (float16 overflows unscaled)."""
        self.value /= 2
        self.backoffs += 1
        if self.value < MIN_LOSS_SCALE:
            raise FloatingPointError("float16 gradients overflow even without loss scaling; score with "
                                     "compute_dtype: float32")

    def describe(self) -> dict[str, Any]:
        """For run.json: the scale used and how often it backed off."""
        return {"enabled": self.enabled, "initial": self.initial, "final": self.value, "backoffs": self.backoffs}


def finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf (tests the sum: one reduction, no boolean copy)."""
    return bool(torch.isfinite(t.sum()))


class GradAccumulator:
    """float32 gradient sums of named parameters, one buffer per weight on the weight's own device.

    A post-accumulate-grad hook takes each parameter's ``.grad`` as soon as autograd has accumulated it,
    unscales it, hands it to ``on_grad(name, grad_float32)`` (default: add it into the weight's buffer)
    and sets ``.grad`` to None. A float32 gradient's first contribution becomes the buffer itself (no
    copy), later ones are added in place: the same sums, bit for bit, as autograd accumulating ``.grad``.
    With float16 loss scaling an inf/NaN gradient is dropped and :attr:`overflow` set; the caller raises
    :class:`GradientOverflow` after the backward (:meth:`check_overflow`) and redoes its pass.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], scale: LossScale | None = None,
                 on_grad: Callable[[str, torch.Tensor], None] | None = None):
        self.params = params
        self.scale = scale or LossScale(False)
        self.on_grad = on_grad or self._add
        self.sums: dict[str, torch.Tensor] = {}
        self.overflow = False
        self._handles: list[Any] = []

    def _add(self, name: str, grad: torch.Tensor) -> None:
        if name in self.sums:
            self.sums[name].add_(grad)
        else:
            self.sums[name] = grad

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            grad, p.grad = p.grad, None
            if grad is None or self.overflow:
                return
            if self.scale.enabled:
                if not finite(grad):
                    self.overflow = True
                    return
                grad = grad.float().mul_(1 / self.scale.value)
            elif grad.dtype != torch.float32:
                grad = grad.float()
            self.on_grad(name, grad)

        return hook

    def __enter__(self) -> "GradAccumulator":
        """Register the hooks (parameters must require grad)."""
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in self.params.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        """Remove the hooks and drop any gradient left on the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in self.params.values():
            p.grad = None

    def check_overflow(self) -> None:
        """Raise :class:`GradientOverflow` when the last backward overflowed (loss scaling only)."""
        if self.overflow:
            raise GradientOverflow(f"float16 gradients overflowed at loss scale {self.scale.value:g}")

    def reset(self) -> None:
        """Forget every sum and the overflow flag (a redo starts from zero)."""
        self.sums.clear()
        self.overflow = False

    def result(self) -> dict[str, torch.Tensor]:
        """The float32 sum of every parameter (zeros where the loss never reached it)."""
        return {n: self.sums.pop(n) if n in self.sums else torch.zeros_like(p, dtype=torch.float32)
                for n, p in self.params.items()}


def refuse_silent_underflow(sums: dict[str, torch.Tensor], scale: LossScale) -> None:
    """float16: a weight whose whole gradient sum is zero even at the loss scale means underflow, not signal."""
    if not scale.enabled:
        return
    for name, t in sums.items():
        if not bool(t.any()):
            raise FloatingPointError(f"the float16 gradient of {name} is zero everywhere even at loss scale "
                                     f"{scale.value:g} (underflow); score with compute_dtype: float32")


@contextlib.contextmanager
def requires_grad_only(model: torch.nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Let autograd track only ``names``; afterwards every flag is back and no ``.grad`` is left."""
    names = set(names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
            p.grad = None
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None


def scoring_dtype(model: torch.nn.Module, compute_dtype: torch.dtype | None) -> dict[str, Any]:
    """What run.json records about scoring precision: the dtype the model computed in, and the sums' dtype."""
    computed = compute_dtype or model_dtype(model)
    return {"compute_dtype": str(computed).removeprefix("torch."),
            "cast": compute_dtype is not None, "accumulators": "float32"}
