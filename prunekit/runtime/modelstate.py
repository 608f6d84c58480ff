"""Record a model's per-tensor dtype, device and ``requires_grad`` and put them back after prunekit worked on it.

Scoring casts the model to float32 and toggles ``requires_grad``; pruning replaces weight tensors (new
parameters come back with ``requires_grad=True``). A caller's model must come back as it went in, tensor
by tensor (a bfloat16 model may hold float32 buffers such as rotary frequencies), so this works by name.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class TensorState:
    """dtype, device and (for parameters) ``requires_grad`` of one named tensor."""

    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False


@dataclass(frozen=True)
class ModelState:
    """A snapshot of every parameter's and buffer's dtype/device/requires_grad, and the training mode."""

    params: dict[str, TensorState]
    buffers: dict[str, TensorState]
    training: bool

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelState":
        """Snapshot ``model`` (no tensor is copied)."""
        return cls(
            params={n: TensorState(p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()},
            buffers={n: TensorState(b.dtype, b.device) for n, b in model.named_buffers()},
            training=model.training,
        )

    def restore(self, model: torch.nn.Module) -> None:
        """Put every tensor that still exists back to its recorded dtype/device/requires_grad (shapes may have
        changed: pruning keeps names), clear gradients, and restore the training mode."""
        for name, p in model.named_parameters():
            state = self.params.get(name)
            if state is None:
                continue
            if p.dtype != state.dtype or p.device != state.device:
                p.data = p.data.to(device=state.device, dtype=state.dtype)
            p.grad = None
            p.requires_grad_(state.requires_grad)
        for name, b in list(model.named_buffers()):
            state = self.buffers.get(name)
            if state is not None and (b.dtype != state.dtype or b.device != state.device):
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                module._buffers[attr] = b.to(device=state.device, dtype=state.dtype)
        model.train(self.training)


@contextlib.contextmanager
def preserved(model: torch.nn.Module) -> Iterator[ModelState]:
    """Run a block that may cast or re-grad ``model``; afterwards (also on error) restore its recorded state."""
    state = ModelState.of(model)
    try:
        yield state
    finally:
        state.restore(model)


@contextlib.contextmanager
def computed_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """Cast the floating-point tensors of ``model`` to ``dtype`` for the block, then restore each one's own dtype.

    float32 over a bfloat16/float16 model is lossless both ways, so the restored weights are bit-identical.
    """
    with preserved(model):
        if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
            model.to(dtype)
        yield model


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put a model in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
