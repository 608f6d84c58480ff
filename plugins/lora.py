"""``lora``: LoRA recovery after pruning (LLM-Pruner / MoreauPruner recipe) with peft, merged back into the weights.

Adapters are trained in float32 with a plain AdamW loop (linear warm-up and decay, gradient clipping at
1.0, the Trainer defaults the reference recipe ran with), then ``merge_and_unload`` folds them into the
pruned ``Linear`` layers, so the model keeps its exact pruned shapes and loads without peft.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from prunekit import hookimpl
from prunekit.data import SOURCES, recovery_texts
from prunekit.errors import UserError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraOptions(BaseModel):
    """LoRA recovery settings; defaults are the reference recipe except the CPU-sized ``max_examples``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(default=8, ge=1, description="LoRA rank")
    alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(TARGETS), min_length=1)
    lr: float = Field(default=1e-4, gt=0)
    epochs: int = Field(default=2, ge=1)
    cutoff_len: int = Field(default=256, ge=2, description="tokens per example (longer ones are truncated)")
    batch_size: int = Field(default=4, ge=1)
    max_examples: int = Field(default=64, ge=1, description="training texts drawn from `source` (CPU-sized default)")
    source: str = Field(default="ptb", description="offline: ptb, wikitext2; online: alpaca-cleaned (the reference)")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1,
                             description="adapter init, dropout and shuffling; default: the run's seed")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v not in SOURCES:
            raise ValueError(f"{v!r} is not one of {', '.join(SOURCES)}")
        return v


def encode(tokenizer: Any, texts: list[str], cutoff_len: int) -> list[list[int]]:
    """Token ids per text, truncated to ``cutoff_len``, EOS appended when there is room (as LLM-Pruner does)."""
    eos = tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"]
        if eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        out.append(ids)
    return out


def collate(examples: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding) for one batch."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def batches(examples: list[list[int]], batch_size: int, pad_id: int, order: list[int]) -> list[dict[str, torch.Tensor]]:
    """The examples in ``order``, collated into batches."""
    return [collate([examples[i] for i in order[s:s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss of ``model`` on collated batches (eval mode, no dropout)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total = count = 0.0
    for batch in data:
        n = float((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss) * n
        count += n
    model.train(was_training)
    return total / count


def _progress() -> Progress:
    """A transient rich bar on stderr, off with PRUNEKIT_PROGRESS=0."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                    disable=os.environ.get("PRUNEKIT_PROGRESS", "1") == "0")


class LoraRecovery:
    """Fine-tune LoRA adapters on recovery text, then merge them into the pruned weights."""

    Options = LoraOptions

    def __init__(self, options: LoraOptions | None = None) -> None:
        self.options = options or LoraOptions()
        self.info: dict[str, Any] = {}

    def examples(self, tokenizer: Any, seed: int) -> list[list[int]]:
        """The tokenized training examples (the same ones for the same options and seed)."""
        o = self.options
        return encode(tokenizer, recovery_texts(o.source, n=o.max_examples, seed=seed), o.cutoff_len)

    def recover(self, model: torch.nn.Module, tokenizer: Any, config: Any = None) -> dict[str, Any]:
        """Train LoRA on ``model`` in float32, merge it in place, restore the dtype; returns training info."""
        o = self.options
        seed = o.seed if o.seed is not None else getattr(config, "seed", 42)
        examples = self.examples(tokenizer, seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        first = next(model.parameters())
        dtype, device, was_training = first.dtype, first.device, model.training
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        started = time.perf_counter()
        model.float()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave global RNG alone
                torch.manual_seed(seed)
                peft_model = self._wrap(model)
                try:
                    losses, steps = self._train(peft_model, examples, pad_id, seed)
                    merged = peft_model.merge_and_unload()
                except BaseException:
                    peft_model.unload()  # leave the caller's model as it was, without adapters
                    raise
        finally:
            model.to(dtype).train(was_training)
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, False))
        assert merged is model  # peft merged into the very modules the caller holds
        self.info = {"source": o.source, "examples": len(examples), "tokens": sum(map(len, examples)),
                     "epochs": o.epochs, "steps": steps, "loss_first_epoch": losses[0],
                     "loss_last_epoch": losses[-1], "seconds": round(time.perf_counter() - started, 2)}
        return self.info

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with peft LoRA adapters on every target Linear (whatever its pruned width)."""
        from peft import LoraConfig, get_peft_model

        o = self.options
        lora = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=list(o.target_modules),
                          bias="none", task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():  # peft <-> transformers 5 deprecation noise, not the user's concern
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return get_peft_model(model, lora)
        except ValueError as exc:
            raise UserError(f"recovery.options.target_modules: {str(exc).splitlines()[0]}") from None

    def _train(self, peft_model: torch.nn.Module, examples: list[list[int]], pad_id: int,
               seed: int) -> tuple[list[float], int]:
        """The AdamW loop; returns the mean training loss of every epoch and the number of steps."""
        from transformers import get_linear_schedule_with_warmup

        o = self.options
        params = [p for p in peft_model.parameters() if p.requires_grad]
        per_epoch = math.ceil(len(examples) / o.batch_size)
        total = per_epoch * o.epochs
        optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=0.0)
        schedule = get_linear_schedule_with_warmup(optimizer, min(100, total // 10), total)
        device = next(peft_model.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        epoch_losses: list[float] = []
        peft_model.train()
        with _progress() as bar:
            job = bar.add_task("LoRA recovery", total=total)
            for epoch in range(o.epochs):
                order = torch.randperm(len(examples), generator=generator).tolist()
                running = []
                for batch in batches(examples, o.batch_size, pad_id, order):
                    loss = peft_model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"LoRA recovery: non-finite loss at epoch {epoch + 1}; lower recovery.options.lr")
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    running.append(loss.item())
                    bar.update(job, advance=1, description=f"LoRA epoch {epoch + 1}/{o.epochs} loss {running[-1]:.3f}")
                epoch_losses.append(sum(running) / len(running))
        return epoch_losses, total


@hookimpl
def prunekit_register_recovery(register) -> None:
    register("lora", LoraRecovery)
