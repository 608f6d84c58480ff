"""Saving and loading pruned models, written atomically so a failed run leaves nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from prunekit.errors import UserError


def check_output_dir(output: Path, overwrite: bool, model_source: str | None = None) -> None:
    """Refuse an existing non-empty output directory (unless ``overwrite``) or one that is the input model."""
    if model_source and Path(model_source).exists() and Path(model_source).resolve() == output.resolve():
        raise UserError(f"output: {output} is the input model; choose another directory")
    if output.exists() and not output.is_dir():
        raise UserError(f"output: {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"output: {output} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_directory(output: Path) -> Iterator[Path]:
    """Yield a scratch directory beside ``output``; it replaces ``output`` only if the block succeeds."""
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield scratch
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / output.name)
            os.replace(scratch, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, output)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def save_pruned(model, tokenizer, output: Path, manifest: dict[str, Any]) -> None:
    """``save_pretrained`` + tokenizer + ``run.json``, all-or-nothing."""
    with atomic_directory(output) as scratch:
        model.save_pretrained(scratch)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
        (scratch / "run.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Load a model prunekit saved, including per-layer shapes that plain ``from_pretrained`` refuses.

    Uniform shapes (every layer pruned alike) also load with ``AutoModelForCausalLM.from_pretrained``;
    per-layer shapes (the default layer range keeps the first and last layers whole) need this call.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.adapters.base import LayerShape
    from prunekit.adapters.checkpoint import model_keys
    from prunekit.registry import get_registry

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    shapes = getattr(config, "prunekit_layer_shapes", None)
    if not shapes:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    get_registry().adapter_for(model).rebuild([LayerShape(**s) for s in shapes])
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    state = model_keys(model, state)  # undo transformers' save-time renames (GPT-NeoX: embed_out)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"model: {path} does not match its config (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.to(device).eval()
