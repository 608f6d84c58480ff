"""The calibration-loss probe a measuring allocator uses: the loss with some units' outputs zeroed, no gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunekit.core.groups import PruningGroup


class LossProbe:
    """Calibration loss of the model with some units' outputs zeroed, without gradients.

    Zeroing a unit's input columns of o_proj / down_proj equals removing it (the pruned model's logits
    equal those of the zeroed original). The inputs of every decoder layer are cached from one dense
    pass, so a change in layer L re-runs only layers L.. and the head.
    """

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList, batches: list[torch.Tensor]):
        self.model, self.layers, self.batches = model, layers, batches
        self._inputs: list[list[tuple[tuple, dict]]] = []
        self._remembered: list[dict[int, torch.Tensor]] | None = None  # layer inputs of the last remembered call
        self.base = self._capture()

    @torch.no_grad()
    def _capture(self) -> float:
        """Dense loss, recording each layer's positional and keyword inputs for every batch."""
        records: list[tuple[tuple, dict]] = []

        def hook(_module, args, kwargs):
            records.append((args, dict(kwargs)))

        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self.layers]
        total, count = 0.0, 0
        try:
            for batch in self.batches:
                records.clear()
                logits = self.model(input_ids=batch.to(self._device), use_cache=False).logits
                self._inputs.append(list(records))
                nll, n = self._nll(logits, batch)
                total, count = total + nll, count + n
        finally:
            for h in handles:
                h.remove()
        if any(len(r) != len(self.layers) or any(not a for a, _ in r) for r in self._inputs):
            self._inputs = []  # a model that calls its layers differently: fall back to full passes
        return total / count

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
        targets = batch[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="sum")
        return float(nll), targets.numel()

    @torch.no_grad()
    def _suffix_logits(self, b: int, start: int, seen: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits from layer ``start`` on, from the cached inputs; ``seen`` collects each layer's new input."""
        hidden = self._inputs[b][start][0][0]
        for i in range(start, len(self.layers)):
            if seen is not None:
                seen[i] = hidden
            args, kw = self._inputs[b][i]
            out = self.layers[i](hidden, *args[1:], **kw)
            hidden = out[0] if isinstance(out, tuple) else out
        decoder = self.model.get_decoder()
        return self.model.get_output_embeddings()(decoder.norm(hidden))

    @torch.no_grad()
    def rebase(self, removed: dict[int, tuple[PruningGroup, torch.Tensor]]) -> float:
        """Re-record every layer's inputs with ``removed`` applied and return that loss: later calls of
        :meth:`loss` whose removals differ from ``removed`` only in layers >= ``start`` may then re-run
        from ``start`` (a local search re-measures one move at a time)."""
        saved = self._zero(removed)
        try:
            self._inputs, self._remembered = [], None
            return self._capture()
        finally:
            self._restore(saved)

    def _zero(self, removed: dict[int, tuple[PruningGroup, torch.Tensor]]) -> list:
        saved = []
        for group, units in removed.values():
            if units.numel() == 0:
                continue
            for s in group.slices:
                if s.dim != 1:
                    continue
                weight = self.model.get_submodule(s.module_name).weight
                cols = group.channels_of(units, s)
                saved.append((weight, cols, weight[:, cols].clone()))
                weight[:, cols] = 0
        return saved

    @staticmethod
    def _restore(saved: list) -> None:
        for weight, cols, values in reversed(saved):
            weight[:, cols] = values

    def adopt(self) -> bool:
        """Make the layer inputs of the last ``loss(..., remember=True)`` call the cached ones: what :meth:`rebase`
        with that call's removals would record, without its full pass. False when there is nothing to adopt."""
        if not self._remembered:
            return False
        for b, seen in enumerate(self._remembered):
            for i, hidden in seen.items():
                args, kw = self._inputs[b][i]
                self._inputs[b][i] = ((hidden, *args[1:]), kw)
        self._remembered = None
        return True

    @torch.no_grad()
    def loss(self, removed: dict[int, tuple[PruningGroup, torch.Tensor]], start: int | None = None,
             remember: bool = False) -> float:
        """Mean calibration NLL with the given units removed ({key: (group, removed unit indices)}).

        ``start``: re-run from this layer (the cached inputs must already reflect every removal before it,
        see :meth:`rebase`); default: the first layer with a removal, from the dense inputs. ``remember``: keep
        the layer inputs this call computed, for :meth:`adopt`.
        """
        self._remembered = None
        seen: list[dict[int, torch.Tensor]] = []
        saved = self._zero(removed)
        try:
            first = min((g.layer for g, u in removed.values() if u.numel()), default=len(self.layers))
            if start is not None:
                first = min(start, len(self.layers) - 1)
            total, count = 0.0, 0
            for b, batch in enumerate(self.batches):
                if first >= len(self.layers):
                    return self.base
                if self._inputs and hasattr(self.model.get_decoder(), "norm"):
                    seen.append({})
                    logits = self._suffix_logits(b, first, seen[-1] if remember else None)
                else:
                    logits = self.model(input_ids=batch.to(self._device), use_cache=False).logits
                nll, n = self._nll(logits, batch)
                total, count = total + nll, count + n
            if remember and len(seen) == len(self.batches):
                self._remembered = seen
            return total / count
        finally:
            self._restore(saved)
