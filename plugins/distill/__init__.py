"""``distill``: recovery by knowledge distillation from the dense model, on ``lora``'s Trainer.

The pruned model (the student) learns to match the dense model (the teacher): KL divergence between their
temperature-softened next-token distributions, times T² (Hinton et al.), optionally mixed with the plain LM
loss (``alpha``) and a mean squared error between the decoders' final hidden states (``hidden_weight``).
``adapter: lora`` trains LoRA adapters and merges them like ``lora``; ``adapter: full`` trains every parameter.

The text, token budget, optimizer, precision and engine options (accelerate, FSDP, DeepSpeed) are ``lora``'s
(:class:`prunekit.builtin.lora.TrainOptions`), and so is the training loop: only ``compute_loss`` differs
(:mod:`prunekit.builtin.distill.trainer`). The teacher arrives through the core's teacher contract
(``needs_teacher = True``: ``recover(model, tokenizer, config, teacher=...)``; docs/plugins.md): in
``prunekit run`` the untouched dense copy taken before pruning, in ``prunekit recover`` the model named by
``teacher`` or else the source model recorded in the checkpoint's run.json. It stays in its own dtype, in eval
mode, without gradients; the logits loss never holds a float32 copy of more than one chunk of logits
(:mod:`prunekit.builtin.distill.loss`). docs/recovery.md has the details.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from prunekit import hookimpl
from prunekit.builtin.distill.loss import kd_loss, reference_kd_loss, shifted
from prunekit.builtin.distill.trainer import Distiller, trainer_class
from prunekit.builtin.lora import AdapterShape, LoraRecovery, TrainOptions
from prunekit.errors import UserError
from prunekit.runtime.modelstate import eval_mode, preserved

__all__ = ["DistillOptions", "DistillRecovery", "Distiller", "kd_loss", "mean_kl", "prunekit_register_recovery",
           "reference_kd_loss", "shifted"]

LORA_ONLY = ("r", "lora_alpha", "dropout", "target_modules")
# lora's 1e-4 barely moves a distilled student: at 1e-3 the KL moves it further on every text (docs/recovery.md)
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}


class _Adapter(BaseModel):
    """What is trained; declared before the LoRA fields so that their validators can see it."""

    adapter: Literal["lora", "full"] = Field(default="lora", description="lora: LoRA adapters merged afterwards; "
                                                                         "full: every parameter is trained")


class DistillOptions(AdapterShape, _Adapter, TrainOptions):
    """Distillation settings: the loss, what is trained, the teacher; the rest is ``lora``'s."""

    lr: float = Field(default=None, gt=0, validate_default=False,  # type: ignore[assignment]
                      description="AdamW peak learning rate; default 1e-3 with LoRA adapters (chosen on validation "
                                  "text, docs/recovery.md), 1e-4 with adapter: full (not measured)")
    temperature: float = Field(default=2.0, gt=0, description="softens both distributions; the KL term is "
                                                               "scaled by T² so its gradients keep their size")
    alpha: float = Field(default=1.0, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs the LM "
                                                              "loss on the text (1.0: pure distillation)")
    hidden_weight: float = Field(default=0.0, ge=0, description="weight of the MSE between the final hidden "
                                                                "states of student and teacher (0: off)")
    lora_alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale = lora_alpha / r)")
    teacher: str | None = Field(default=None, description="teacher model folder or hub id; default: the dense "
                                                          "model of the run (prunekit recover: the source model "
                                                          "in the checkpoint's run.json)")

    @model_validator(mode="after")
    def _default_lr(self) -> "DistillOptions":
        if self.lr is None:
            self.lr = DEFAULT_LR[self.adapter]
        return self

    @field_validator("teacher")
    @classmethod
    def _named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty; give a model folder or a hub id, or leave it out for the dense model")
        return v

    @field_validator(*LORA_ONLY)
    @classmethod
    def _lora_only(cls, v: Any, info: ValidationInfo) -> Any:
        if info.data.get("adapter") == "full":  # validators run on the fields a user gave, not on defaults
            raise ValueError("sets LoRA adapters, which adapter: full does not use; leave it out")
        return v


class DistillRecovery(LoraRecovery):
    """Knowledge distillation from the dense model: KL on softened logits (+ hidden states), LoRA or full."""

    Options = DistillOptions
    needs_teacher = True  # the core calls recover(model, tokenizer, config, teacher=...)
    title = "distill"

    def __init__(self, options: DistillOptions | None = None) -> None:
        super().__init__(options or DistillOptions())
        self.distiller: Distiller | None = None
        self.trainable = 0  # parameters the last run trained (adapters, or all of them)

    def recover(self, model: torch.nn.Module, tokenizer: Any, config: Any = None,
                teacher: torch.nn.Module | None = None) -> dict[str, Any]:
        """Train ``model`` (in place, in its own dtype) towards ``teacher``'s outputs; returns training info.
        ``teacher`` is used as it is (eval mode, no gradients, its own dtype; moved to the student's device
        when a launcher moved the student) and left as it was found."""
        o = self.options
        if teacher is None:
            raise UserError("recovery.options.teacher: distill needs a teacher model (prunekit run passes the dense "
                            "model; called directly, pass teacher=)")
        check_teacher(model, teacher, o.hidden_weight > 0)
        with preserved(teacher):
            teacher.eval()
            teacher.requires_grad_(False)
            self.distiller = Distiller(teacher, model, o.temperature, o.alpha, o.hidden_weight)
            try:
                info = super().recover(model, tokenizer, config)
                kl = self.distiller.means("kl")
                teacher_dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.")
                extra: dict[str, Any] = {"adapter": o.adapter, "temperature": o.temperature, "alpha": o.alpha,
                                         "hidden_weight": o.hidden_weight, "kl_first_epoch": kl[0],
                                         "kl_last_epoch": kl[-1], "teacher_dtype": teacher_dtype,
                                         "trainable_parameters": self.trainable}
                for term, used in (("ce", o.alpha < 1), ("mse", o.hidden_weight > 0)):
                    if used:
                        means = self.distiller.means(term)
                        extra[f"{term}_first_epoch"], extra[f"{term}_last_epoch"] = means[0], means[-1]
            finally:
                self.distiller.release()
                self.distiller = None
        self.info = {**info, **extra}
        return self.info

    def fit(self, model: torch.nn.Module, examples: list[list[int]], pad_id: int, seed: int, dtype: torch.dtype,
            device: torch.device) -> dict[str, Any]:
        """``lora``'s adapters, or (``adapter: full``) every parameter trainable; ``recover`` restores the flags.
        Either way a failed or interrupted run leaves the model's weights as they were (full: from a copy of
        them, which costs one more model's memory next to the optimizer's two)."""
        if self.options.adapter == "lora":
            return super().fit(model, examples, pad_id, seed, dtype, device)
        model.requires_grad_(True)
        before = {name: t.detach().clone() for name, t in model.state_dict().items()}
        try:
            return self._train(model, examples, pad_id, seed, dtype, device)
        except BaseException:
            with torch.no_grad():
                model.load_state_dict(before)
            raise

    def _train(self, trained: torch.nn.Module, *args: Any) -> dict[str, Any]:
        """``lora``'s Trainer run, after counting what it trains."""
        self.trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        return super()._train(trained, *args)

    def trainer_factory(self) -> Any:
        """The Trainer subclass whose ``compute_loss`` is the distillation loss."""
        return functools.partial(trainer_class(), distiller=self.distiller)


def check_teacher(student: torch.nn.Module, teacher: torch.nn.Module, hidden: bool) -> None:
    """A teacher whose logits (and, for ``hidden_weight``, final hidden states) line up with the student's."""
    if teacher is student:
        raise UserError("recovery.options.teacher: the teacher is the student itself; pass the dense model")
    sizes = {}
    for role, m in (("student", student), ("teacher", teacher)):
        head = m.get_output_embeddings()
        sizes[role] = (getattr(head, "out_features", None) or getattr(m.config, "vocab_size", None),
                       getattr(m.config, "hidden_size", None))
    if sizes["teacher"][0] != sizes["student"][0]:
        raise UserError(f"recovery.options.teacher: the teacher's vocabulary has {sizes['teacher'][0]} logits, the "
                        f"pruned model's {sizes['student'][0]}; distill from the model it was pruned from")
    if hidden and sizes["teacher"][1] != sizes["student"][1]:
        raise UserError(f"recovery.options.hidden_weight: the teacher's hidden size {sizes['teacher'][1]} differs "
                        f"from the pruned model's {sizes['student'][1]}; set hidden_weight: 0")


@torch.no_grad()
def mean_kl(student: torch.nn.Module, teacher: torch.nn.Module, data: list[dict[str, torch.Tensor]],
            temperature: float = 1.0) -> float:
    """Token-weighted mean KL(teacher_T ‖ student_T) per scored position over collated batches (``input_ids``,
    ``attention_mask``, ``labels``; :func:`prunekit.builtin.lora.batches`), both models in eval mode."""
    total = count = 0.0
    device = next(student.parameters()).device
    with eval_mode(student), eval_mode(teacher):
        for batch in data:
            ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            mask, _ = shifted(batch["labels"].to(device))
            logits = student(input_ids=ids, attention_mask=attention, use_cache=False).logits
            reference = teacher(input_ids=ids, attention_mask=attention, use_cache=False).logits
            _, kl, _ = kd_loss(logits, reference, mask, temperature=temperature)
            total += float(kl)
            count += float(mask.sum())
    return total / max(count, 1.0)


@hookimpl
def prunekit_register_recovery(register) -> None:
    register("distill", DistillRecovery)
