"""The Hugging Face Trainer half of the ``lora`` recovery plugin: the recipe's ``TrainingArguments``, the
dataset, and callbacks that record per-epoch losses, refuse non-finite ones and draw a rich progress bar.

Kept apart from :mod:`prunekit.builtin.lora` so that what the Trainer is asked to do is readable in one place.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def _arguments_class():
    """``TrainingArguments`` whose warm-up is ``min(100, steps // 10)`` steps (LLM-Pruner's recipe), counted
    on the Trainer's own number of optimizer steps (which depends on processes and accumulation)."""
    from transformers import TrainingArguments

    class RecipeArguments(TrainingArguments):
        def get_warmup_steps(self, num_training_steps: int) -> int:
            return min(100, num_training_steps // 10)

    return RecipeArguments


def recipe_arguments(options: Any, output_dir: str, seed: int, dtype: torch.dtype, use_cpu: bool) -> Any:
    """``TrainingArguments`` for ``options`` (LoraOptions): AdamW without weight decay, linear schedule,
    gradient clipping at 1.0, bf16/fp16 mixed precision when the model is bf16/fp16, nothing saved or reported."""
    extra: dict[str, Any] = {}
    if options.fsdp:
        extra["fsdp"] = options.fsdp
        if options.fsdp_config is not None:
            extra["fsdp_config"] = options.fsdp_config
    if options.deepspeed is not None:
        extra["deepspeed"] = options.deepspeed
    cls = _arguments_class()
    if options.gradient_checkpointing:  # transformers 5.x renamed it "activation" checkpointing
        name = ("activation_checkpointing" if "activation_checkpointing" in cls.__dataclass_fields__
                else "gradient_checkpointing")
        extra[name] = True
        extra[f"{name}_kwargs"] = {"use_reentrant": False}  # frozen embeddings: no input grads needed
    return cls(
        output_dir=output_dir, save_strategy="no", eval_strategy="no", report_to="none",
        num_train_epochs=options.epochs, per_device_train_batch_size=options.device_batch,
        gradient_accumulation_steps=options.gradient_accumulation_steps, learning_rate=options.lr,
        weight_decay=0.0, optim="adamw_torch", lr_scheduler_type="linear", max_grad_norm=1.0,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, seed=seed, data_seed=seed,
        logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, ddp_find_unused_parameters=False,
        use_cpu=use_cpu, **extra)


class Examples(torch.utils.data.Dataset):
    """Tokenized examples as a map-style dataset (the Trainer shuffles and shards it)."""

    def __init__(self, examples: list[list[int]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> list[int]:
        return self.examples[i]


def _callbacks(title: str = "LoRA"):
    """The callback classes (imported lazily: transformers is heavy); ``title`` names the training in the
    progress bar and the errors."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class EpochLosses(TrainerCallback):
        """Mean logged training loss of every epoch; a non-finite loss stops training with a clear error."""

        def __init__(self) -> None:
            self.per_epoch: dict[int, list[float]] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            epoch = max(math.ceil(round(float(logs.get("epoch", state.epoch or 1)), 6)) - 1, 0)
            if not math.isfinite(loss):
                raise RuntimeError(f"{title} recovery: non-finite loss at epoch {epoch + 1}; lower recovery.options.lr")
            self.per_epoch.setdefault(epoch, []).append(loss)

        def means(self) -> list[float]:
            return [sum(v) / len(v) for _, v in sorted(self.per_epoch.items())]

    class RichBar(TrainerCallback):
        """A transient rich bar on stderr on the main process, on a terminal only (off with PRUNEKIT_PROGRESS=0)."""

        def __init__(self) -> None:
            self.bar: Progress | None = None
            self.job = None

        def on_train_begin(self, args, state, control, **kwargs):
            from prunekit.runtime.progress import enabled

            if not state.is_local_process_zero or not enabled():  # off in a log and with PRUNEKIT_PROGRESS=0
                return
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            self.bar.start()
            self.job = self.bar.add_task(f"{title} recovery", total=state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.update(self.job, completed=state.global_step,
                                description=f"{title} epoch {math.ceil(state.epoch or 1)}/{args.num_train_epochs:g} "
                                            f"loss {float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return EpochLosses, RichBar


def train(peft_model: torch.nn.Module, args: Any, examples: list[list[int]],
          collator: Callable[[list[list[int]]], dict[str, torch.Tensor]],
          callbacks: list[Any] = (), factory: Callable[..., Any] | None = None,
          title: str = "LoRA") -> dict[str, Any]:
    """Train ``peft_model`` (a peft model, or a plain one whose trainable parameters are set) with the Trainer
    that ``factory`` builds (``transformers.Trainer`` when None; a subclass overriding ``compute_loss``, such as
    ``distill``'s, takes the same arguments). Returns ``losses`` (mean training loss of every epoch), ``steps``,
    ``engine`` (what accelerate ran: ``NO``, ``MULTI_CPU``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``) and ``whole``:
    whether this process holds the full trained weights. After FSDP or DeepSpeed the weights are gathered
    (every process takes part) and only the main process gets them back into ``peft_model``."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from prunekit.builtin.lora.unshard import ModuleTree

    EpochLosses, RichBar = _callbacks(title)
    losses = EpochLosses()
    trainer = (factory or Trainer)(model=peft_model, args=args, train_dataset=Examples(examples),
                                   data_collator=collator, callbacks=[losses, RichBar(), *callbacks])
    for quiet in (PrinterCallback, ProgressCallback):  # the rich bar replaces them
        trainer.remove_callback(quiet)
    tree = ModuleTree(peft_model)
    trainer.train()
    engine = str(getattr(trainer.accelerator.distributed_type, "value", trainer.accelerator.distributed_type))
    whole = True
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:  # sharded or engine-owned: gather, then unwrap
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if trainer.accelerator.is_main_process:
            tree.restore(state)
        else:
            tree.restore_structure()
            whole = False
    scaling = getattr(trainer.accelerator, "scaler", None) is not None  # fp16: gradients are loss-scaled
    return {"losses": losses.means(), "steps": trainer.state.global_step, "engine": engine, "whole": whole,
            "loss_scaling": scaling}
