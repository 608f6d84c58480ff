"""``lora``: LoRA recovery after pruning (LLM-Pruner / MoreauPruner recipe) with peft on the Hugging Face Trainer.

The base weights stay in their load dtype (no float32 copy of the model); peft keeps the adapters in float32
and the Trainer runs bf16/fp16 mixed precision when the model is bf16/fp16. Linear warm-up and decay,
gradient clipping at 1.0 and AdamW without weight decay are the Trainer settings of the reference recipe.
``merge_and_unload`` then folds the adapters into the pruned ``Linear`` layers, so the model keeps its exact
pruned shapes and loads without peft. The same loop runs data parallel under ``accelerate launch`` and
passes ``fsdp`` / ``fsdp_config`` / ``deepspeed`` through to ``TrainingArguments`` (docs/recovery.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prunekit import hookimpl
from prunekit.data.sources import check_source, recovery_texts
from prunekit.errors import UserError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2", "offload", "auto_wrap")


def _json_object(value: Any, what: str) -> dict[str, Any]:
    """A dict given inline, or the JSON object in the file ``value`` names."""
    if isinstance(value, dict):
        return value
    path = Path(os.path.expanduser(str(value)))
    if not path.is_file():
        raise ValueError(f"{what} {str(value)!r} is not a file (give a path to a JSON file or an inline mapping)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no JSON object")
    return data


class TrainOptions(BaseModel):
    """What every Trainer-based recovery shares: the text, the token budget, the optimizer and the engine
    (``lora`` and ``distill`` subclass it; defaults are the reference recipe except the CPU-sized ``max_examples``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(default=1e-4, gt=0)
    epochs: int = Field(default=2, ge=1)
    cutoff_len: int = Field(default=256, ge=2, description="tokens per example (longer ones are truncated)")
    batch_size: int = Field(default=4, ge=1, description="examples per forward pass on each process "
                                                         "(same as per_device_batch_size)")
    per_device_batch_size: int | None = Field(default=None, ge=1, description="examples per forward pass on each "
                                                                              "process; default: batch_size")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="forward passes per optimizer step")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in backward (less memory)")
    max_examples: int = Field(default=64, ge=1, description="training texts drawn from `source` (CPU-sized default)")
    source: str = Field(default="ptb", description="offline: ptb (chosen on validation text, docs/recovery.md), "
                                                      "pd-books, wikitext2, a local file or folder; online: "
                                                      "alpaca-cleaned (the reference); or a mixture (pd-books+ptb)")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1,
                             description="adapter init, dropout and shuffling; default: the run's seed")
    fsdp: bool | str | list[str] = Field(default=False, description="TrainingArguments.fsdp: true (configure it in "
                                                                   "fsdp_config) or legacy words such as 'full_shard'")
    fsdp_config: dict[str, Any] | str | None = Field(default=None, description="TrainingArguments.fsdp_config: "
                                                                               "a mapping or a JSON file")
    deepspeed: dict[str, Any] | str | None = Field(default=None, description="TrainingArguments.deepspeed: a ZeRO "
                                                                             "config JSON file or mapping")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        return check_source(v)

    @field_validator("fsdp")
    @classmethod
    def _fsdp_words(cls, v: bool | str | list[str]) -> bool | str:
        if isinstance(v, bool):
            return v
        words = v.split() if isinstance(v, str) else list(v)
        unknown = [w for w in words if w not in FSDP_OPTIONS]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not one of true, false, {', '.join(FSDP_OPTIONS)}")
        return " ".join(words) or False

    @field_validator("fsdp_config")
    @classmethod
    def _fsdp_config_object(cls, v: Any) -> Any:
        if v is not None:
            _json_object(v, "file")
        return v

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_config(cls, v: Any) -> Any:
        if v is None:
            return v
        config = _json_object(v, "file")
        if "zero_optimization" not in config and "train_batch_size" not in config \
                and "train_micro_batch_size_per_gpu" not in config:
            raise ValueError("not a DeepSpeed config (no zero_optimization or batch size keys)")
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("the deepspeed package is not installed (pip install deepspeed)")
        return v

    @model_validator(mode="after")
    def _one_engine(self) -> "TrainOptions":
        if self.fsdp and self.deepspeed is not None:
            raise ValueError("fsdp and deepspeed are alternatives; give one of them")
        if self.fsdp_config is not None and not self.fsdp:
            raise ValueError("fsdp_config needs fsdp: true")
        return self

    @property
    def device_batch(self) -> int:
        """Examples per forward pass on each process."""
        return self.per_device_batch_size or self.batch_size


class AdapterShape(BaseModel):
    """Where LoRA adapters go and how big they are (the scaling numerator is each trainer's own field)."""

    r: int = Field(default=8, ge=1, description="LoRA rank")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(TARGETS), min_length=1)


class LoraOptions(AdapterShape, TrainOptions):
    """LoRA recovery settings; defaults are the reference recipe except the CPU-sized ``max_examples``."""

    alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale = alpha / r)")

    @property
    def lora_alpha(self) -> float:
        """The LoRA scaling numerator (``distill`` names it ``lora_alpha``, its ``alpha`` weighs the KL term)."""
        return self.alpha


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


@contextlib.contextmanager
def kept_global_rng(device: torch.device) -> Iterator[None]:
    """Leave Python's, numpy's and torch's global random state as they were (the Trainer seeds all three)."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on, without transformers 5's deprecated property."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def distributed() -> bool:
    """True under ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class LoraRecovery:
    """Fine-tune LoRA adapters on recovery text with the Trainer, then merge them into the pruned weights."""

    Options = LoraOptions
    title = "LoRA"  # how the progress bar and the errors name the training

    def __init__(self, options: LoraOptions | None = None) -> None:
        self.options = options or LoraOptions()
        self.info: dict[str, Any] = {}
        self.callbacks: list[Any] = []  # extra transformers.TrainerCallback objects (observers, tests)

    def examples(self, tokenizer: Any, seed: int) -> list[list[int]]:
        """The tokenized training examples (the same ones for the same options and seed)."""
        o = self.options
        return encode(tokenizer, recovery_texts(o.source, n=o.max_examples, seed=seed), o.cutoff_len)

    def recover(self, model: torch.nn.Module, tokenizer: Any, config: Any = None) -> dict[str, Any]:
        """Train LoRA on ``model`` in its own dtype, merge it in place; returns training info."""
        o = self.options
        seed = o.seed if o.seed is not None else getattr(config, "seed", 42)
        examples = self.examples(tokenizer, seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        first = next(model.parameters())
        dtype, device, was_training = first.dtype, first.device, model.training
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        use_cache = getattr(model.config, "use_cache", None)
        checkpointing = _checkpointing(model)
        started = time.perf_counter()
        result: dict[str, Any] = {}
        # fp16 needs loss scaling, which accelerate only does on accelerators: on the CPU an fp16 model trains
        # on a float32 copy (as before the Trainer) rather than with silently underflowing gradients
        upcast = dtype == torch.float16 and self.trains_on_cpu(device)
        try:
            if upcast:
                model.float()
            with kept_global_rng(device):  # leave the caller's global RNG alone
                torch.manual_seed(seed)
                model.config.use_cache = False
                result = self.fit(model, examples, pad_id, seed, torch.float32 if upcast else dtype, device)
        finally:
            if upcast:
                model.to(dtype)
            model.config.use_cache = use_cache
            if not checkpointing and _checkpointing(model):
                (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
            if result.get("whole", True):
                if next(model.parameters()).device != device and not getattr(model, "hf_device_map", None):
                    model.to(device)  # the Trainer may have moved it to its accelerator
                for n, p in model.named_parameters():
                    p.requires_grad_(flags.get(n, False))
            model.train(was_training)
        if result["whole"]:
            assert next(model.parameters()).dtype == dtype
        losses = result["losses"]
        self.info = {"source": o.source, "examples": len(examples), "tokens": sum(map(len, examples)),
                     "epochs": o.epochs, "steps": result["steps"], "loss_first_epoch": losses[0],
                     "loss_last_epoch": losses[-1], "processes": int(os.environ.get("WORLD_SIZE", "1")),
                     "engine": result["engine"], "merged_here": result["whole"], "loss_scaling": result["loss_scaling"],
                     "mixed_precision": "no (float32 copy: fp16 on the CPU)" if upcast else
                     {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no"),
                     "seconds": round(time.perf_counter() - started, 2)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # this process's GPU, for the record
            self.info["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return self.info

    def fit(self, model: torch.nn.Module, examples: list[list[int]], pad_id: int, seed: int, dtype: torch.dtype,
            device: torch.device) -> dict[str, Any]:
        """Wrap ``model`` in LoRA adapters, train them and merge them in place (what :meth:`_train` returns). If
        training fails, the adapters are removed and the model is left as it was."""
        peft_model = self._wrap(model)
        result: dict[str, Any] = {}
        try:
            result = self._train(peft_model, examples, pad_id, seed, dtype, device)
            if result["whole"]:
                merged = peft_model.merge_and_unload()
                assert merged is model  # peft merged into the very modules the caller holds
            else:  # another process of a sharded run: the main process holds and saves the merged model
                peft_model.unload()
        except BaseException:
            if result.get("whole", True):
                peft_model.unload()  # leave the caller's model as it was, without adapters
            raise
        return result

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with float32 peft LoRA adapters on every target Linear (whatever its pruned width)."""
        from peft import LoraConfig, get_peft_model

        o = self.options
        lora = LoraConfig(r=o.r, lora_alpha=o.lora_alpha, lora_dropout=o.dropout,
                          target_modules=list(o.target_modules), bias="none", task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():  # peft <-> transformers 5 deprecation noise, not the user's concern
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return get_peft_model(model, lora, autocast_adapter_dtype=True)
        except ValueError as exc:
            raise UserError(f"recovery.options.target_modules: {str(exc).splitlines()[0]}") from None

    @staticmethod
    def trains_on_cpu(device: torch.device) -> bool:
        """Train where the model is; launched processes load on the CPU and go to their own GPU, if there is one."""
        return device.type == "cpu" and (not distributed() or not torch.cuda.is_available()
                                         or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))

    def arguments(self, output_dir: str, seed: int, dtype: torch.dtype, device: torch.device) -> Any:
        """The ``TrainingArguments`` of the recipe: options passed through, precision from the model's dtype."""
        from prunekit.builtin.lora.trainer import recipe_arguments

        return recipe_arguments(self.options, output_dir, seed, dtype, use_cpu=self.trains_on_cpu(device))

    def trainer_factory(self) -> Any:
        """What builds the Trainer: ``None`` for ``transformers.Trainer`` itself (a subclass returns its own)."""
        return None

    def _train(self, trained: torch.nn.Module, examples: list[list[int]], pad_id: int, seed: int,
               dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Run the Trainer (see :func:`prunekit.builtin.lora.trainer.train` for what it returns)."""
        from prunekit.builtin.lora.trainer import train

        with tempfile.TemporaryDirectory(prefix="prunekit-lora-") as scratch:  # the Trainer wants one; nothing is saved
            args = self.arguments(scratch, seed, dtype, device)
            return train(trained, args, examples, lambda rows: collate(rows, pad_id), self.callbacks,
                         factory=self.trainer_factory(), title=self.title)


@hookimpl
def prunekit_register_recovery(register) -> None:
    register("lora", LoraRecovery)
