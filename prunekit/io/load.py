"""Loading a model to prune: a local folder, a hub id or the embedded default model, per-layer checkpoints included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunekit.errors import UserError
from prunekit.importance.finite import check_weights_finite
from prunekit.io.export import load_pruned

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(source: str | None = None, dtype: str = "float32", device: str = "cpu", *,
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               offload_folder: str | Path | None = None) -> tuple[Any, Any, str]:
    """Model (eval mode), tokenizer and resolved source from a local path, a hub id or (``None``) the
    embedded default model; prunekit checkpoints with per-layer shapes included. ``device`` is cpu, cuda or
    cuda:N; ``device_map``/``max_memory``/``offload_folder`` place it with accelerate instead (docs/devices.md)."""
    from transformers import AutoTokenizer

    from prunekit.runtime.devices import placement

    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not supported (accepted: {', '.join(DTYPES)})")
    where = placement(device, device_map, max_memory, offload_folder)
    if source is None:
        from prunekit.runtime.assets import default_model_dir

        source = str(default_model_dir())
    try:
        model = load_pruned(source, dtype=DTYPES[dtype], **where)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except UserError:
        raise
    except Exception as exc:  # corrupt/truncated weights, bad JSON, unknown type: all "cannot load"
        hint = " (offline: pass a local directory)" if not Path(source).exists() else ""
        raise UserError(f"model: cannot load {source!r}: "
                        f"{(str(exc).splitlines() or [type(exc).__name__])[0]}{hint}") from None
    check_weights_finite(model, source)  # NaN/Inf weights: named now, not as a NaN model later
    return model.eval(), tokenizer, source
