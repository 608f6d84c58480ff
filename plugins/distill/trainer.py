"""The Trainer half of ``distill``: the teacher's forward pass and the loss, as a ``compute_loss`` override of the
``transformers.Trainer`` that ``lora`` runs (same arguments, callbacks, accelerate / FSDP / DeepSpeed paths)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from prunekit.builtin.distill.loss import CHUNK_ELEMENTS, kd_loss, shifted


def _last_hidden(output: Any) -> torch.Tensor:
    """The decoder's final hidden states (after its final norm) from whatever its forward returned."""
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


class Distiller:
    """The teacher and the loss: ``alpha · T² · KL(teacher_T ‖ student_T) + (1 - alpha) · CE + hidden_weight · MSE``
    summed over the positions that have a next token (padding masked), each term a per-token mean.

    The teacher runs under ``no_grad`` in its own dtype (autocast off), on the student's device (moved there on
    the first batch when a launcher put the student on its own GPU). With ``hidden_weight`` > 0, forward hooks
    on both decoders (``get_decoder()``) keep only the final hidden states, never every layer's.
    """

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, temperature: float, alpha: float,
                 hidden_weight: float, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.teacher = teacher
        self.temperature, self.alpha, self.hidden_weight = temperature, alpha, hidden_weight
        self.chunk_elements = chunk_elements
        self.hidden: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.sums: dict[int, dict[str, torch.Tensor]] = {}  # epoch -> summed per-token terms, token count
        if hidden_weight > 0:
            for role, model in (("student", student), ("teacher", teacher)):
                self.handles.append(model.get_decoder().register_forward_hook(self._keeper(role)))

    def _keeper(self, role: str):
        def hook(module, args, output):
            self.hidden[role] = _last_hidden(output)
        return hook

    def release(self) -> None:
        """Remove the hooks and drop the teacher (the caller frees it)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.hidden, self.teacher = [], {}, None

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for the batch, in the teacher's dtype, without autograd or autocast."""
        first = next(self.teacher.parameters())
        if first.device != input_ids.device:
            self.teacher.to(input_ids.device)
        off = torch.autocast(input_ids.device.type, enabled=False) if input_ids.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext()
        with torch.no_grad(), off:
            return self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def loss(self, student_logits: torch.Tensor, inputs: dict[str, torch.Tensor], normalizer: float,
             epoch: int = 0) -> torch.Tensor:
        """The summed loss of one batch divided by ``normalizer`` (its token count, or the Trainer's count over
        the whole accumulated batch). ``inputs`` holds ``input_ids``, ``attention_mask`` and ``labels``."""
        student_hidden = self.hidden.pop("student", None)
        teacher = self.teacher_logits(inputs["input_ids"], inputs["attention_mask"])
        teacher_hidden = self.hidden.pop("teacher", None)
        mask, targets = shifted(inputs["labels"])  # shift the targets, never copy the logits
        T = self.temperature
        loss, kl_sum, ce_sum = kd_loss(student_logits, teacher, mask, targets, temperature=T,
                                       kl_weight=self.alpha * T * T / normalizer,
                                       ce_weight=(1 - self.alpha) / normalizer, chunk_elements=self.chunk_elements)
        del teacher
        mse_sum = None
        if self.hidden_weight > 0:
            if student_hidden is None or teacher_hidden is None:
                raise RuntimeError("distill: the decoders' final hidden states were not captured")
            diff = student_hidden[mask].float() - teacher_hidden[mask].float()
            mse_sum = diff.pow(2).mean(-1).sum()
            loss = loss + (self.hidden_weight / normalizer) * mse_sum
        # kept as tensors on the device: no host synchronisation per batch
        terms = {"kl": kl_sum, "ce": ce_sum, "mse": mse_sum.detach() if mse_sum is not None else kl_sum.new_zeros(()),
                 "tokens": mask.sum()}
        sums = self.sums.setdefault(epoch, {})
        for term, value in terms.items():
            sums[term] = sums[term] + value if term in sums else value.clone()
        return loss

    def means(self, term: str) -> list[float]:
        """Per epoch, the per-token mean of ``term`` (``kl``: KL at temperature T, without T²; ``ce``; ``mse``)
        over this process's batches."""
        return [float(s[term]) / max(float(s["tokens"]), 1.0) for _, s in sorted(self.sums.items())]


def trainer_class() -> type:
    """``transformers.Trainer`` with the distillation loss (imported lazily: transformers is heavy)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """The Trainer whose ``compute_loss`` runs the student without labels (no float32 copy of its logits for
        a cross-entropy the loss does not use) and scores it against the teacher."""

        def __init__(self, *args: Any, distiller: Distiller, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.distiller = distiller

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            # the Trainer's own normalisation of a causal LM loss: over the tokens of the whole accumulated batch
            # when it counted them (then the loss counts as scaled for accumulation), else this batch's tokens
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            if scaled:
                count = num_items_in_batch
                count = float(count.flatten()[0]) if torch.is_tensor(count) else float(count)  # DataParallel: repeated
            else:
                count = float((inputs["labels"][:, 1:] != -100).sum())
            epoch = math.floor(round(float(self.state.epoch or 0), 6))  # the epoch this batch belongs to, from 0
            loss = self.distiller.loss(outputs.logits, inputs, max(count, 1.0), epoch=epoch)
            if scaled and self.args.average_tokens_across_devices:  # as Trainer.compute_loss: undo the DDP mean
                loss = loss * (self.accelerator.num_processes // self.get_tp_size()
                               if self.args.n_gpu <= 1 else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer
