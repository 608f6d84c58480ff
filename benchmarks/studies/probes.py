"""Observe what a scoring call really computed in: parameter and activation dtypes seen by forward hooks.

``api.score`` may cast the model (today: to float32) or keep its load dtype (bf16 with float32
accumulators); benchmarks record which one happened instead of assuming it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch


class DtypeProbe:
    """Context manager: counts model forwards, records the parameter dtypes at each forward and the dtype of
    the hidden states entering the first ``nn.Linear`` (the compute dtype of the matmuls)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.forwards = 0
        self.param_dtypes: set[str] = set()
        self.hidden_dtypes: set[str] = set()
        self._handles: list[Any] = []

    def _on_model(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.forwards += 1
        self.param_dtypes.update(str(p.dtype).replace("torch.", "") for p in module.parameters())

    def _on_linear(self, module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.hidden_dtypes.add(str(args[0].dtype).replace("torch.", ""))

    def __enter__(self) -> "DtypeProbe":
        self._handles.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        linear = next((m for m in self.model.modules() if isinstance(m, torch.nn.Linear)), None)
        if linear is not None:
            self._handles.append(linear.register_forward_pre_hook(self._on_linear))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def result(self) -> dict[str, Any]:
        """JSON-ready: forwards seen, parameter dtypes and hidden-state dtypes (sorted)."""
        return {"forwards": self.forwards, "param_dtypes": sorted(self.param_dtypes),
                "hidden_dtypes": sorted(self.hidden_dtypes)}
