"""Fingerprints of a model (weights, config, tokenizer vocabulary) and of source files: the keys of prunekit's
disk caches (dense metrics, allocations)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype")
CHUNK = 1 << 26  # hash big tensors 64 MiB at a time


def code_fingerprint(files: tuple[str, ...]) -> str:
    """SHA-256 of prunekit source files (paths relative to the package), read as bytes: nothing is imported, and
    an edit to them (same version number, e.g. in a checkout) never reads a result the old code produced."""
    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in files:
        h.update((package / name).read_bytes())
    return h.hexdigest()


def _hash_tensor(h: "hashlib._Hash", tensor: torch.Tensor) -> None:
    """Feed a tensor's raw bytes (moved to CPU in chunks) into ``h``."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return
    step = max(1, CHUNK // flat.element_size())
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step].cpu().contiguous()
        h.update(part.view(torch.uint8).numpy().data)


def model_fingerprint(model: torch.nn.Module, tokenizer: Any = None) -> str:
    """SHA-256 of a model's weights, config and tokenizer vocabulary (tied tensors are hashed once)."""
    h = hashlib.sha256()
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        ident = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if ident in seen and tensor.data_ptr():
            continue
        seen.add(ident)
        _hash_tensor(h, tensor)
    config = getattr(model, "config", None)
    if config is not None:
        as_dict = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG}
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    if tokenizer is not None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        special = getattr(tokenizer, "special_tokens_map", {})
        h.update(json.dumps([type(tokenizer).__name__, sorted(vocab.items()), special], sort_keys=True,
                            default=str).encode())
    return h.hexdigest()
