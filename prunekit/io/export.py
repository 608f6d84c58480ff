"""Saving and loading pruned models, written atomically so a failed run leaves nothing half-written.

Where a run may write, the lock, stale-scratch removal and the atomic swap live in :mod:`prunekit.io.safety`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

import prunekit.io.safety as safety
from prunekit.errors import EnvironmentFault, UserError, one_line
from prunekit.io.remote_code import write_remote_code
from prunekit.runtime.paths import expand_path

if TYPE_CHECKING:  # pragma: no cover - typing only
    from prunekit.pipeline.prune import PruneResult


def check_output_dir(output: Path, overwrite: bool, model_source: str | None = None) -> None:
    """Refuse an output location a run must not write (see :func:`prunekit.io.safety.check_output`), then lock it
    for this process and remove scratch folders killed runs left beside it."""
    if model_source is None:  # the embedded model lives in prunekit's cache: protect all of it
        from prunekit.runtime.assets import default_cache_root

        model_source = str(default_cache_root())
    safety.check_output(output, overwrite, model_source)
    safety.claim(expand_path(output, "output"))


@contextmanager
def atomic_directory(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory beside ``output``; it replaces ``output`` only if the block succeeds.

    An existing non-empty ``output`` is replaced only with ``overwrite`` and only when it is a prunekit
    output; the swap is atomic (the path always names a complete directory). The lock on ``output`` is
    released at the end, success or not.
    """
    output = expand_path(output, "output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise safety.os_error(exc, output) from None
    safety.claim(output)
    scratch: Path | None = None
    try:
        if output.is_dir() and any(output.iterdir()):
            if not overwrite:
                raise UserError(f"output: {output} exists and is not empty; pass --overwrite to replace a previous "
                                f"prunekit output, or choose another directory")
            safety.refuse_foreign(output)
        try:
            scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        except OSError as exc:
            raise safety.os_error(exc, output) from None
        safety.fix_mode(scratch)
        safety.pause_point("save:scratch")
        try:
            yield scratch
        except OSError as exc:
            raise safety.os_error(exc, output) from None
        except Exception as exc:  # safetensors reports a full disk as its own error type
            if "os error 28" in str(exc) or "No space left" in str(exc):
                raise EnvironmentFault(f"output: writing {output} failed (no space left on device); "
                                       f"nothing was saved") from None
            raise
        safety.fix_mode(scratch)  # the files written into it, with ordinary permissions
        safety.pause_point("save:publish")
        try:
            old = safety.publish(scratch, output)
        except OSError as exc:  # an output made immutable or read-only meanwhile: nothing was replaced
            raise safety.os_error(exc, output) from None
        safety.pause_point("save:published")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if scratch is not None and scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
        safety.release(output)


def save_pruned(model, tokenizer, output: Path, manifest: dict[str, Any], overwrite: bool | None = None,
                extras: Callable[[Path], None] | None = None) -> None:
    """``save_pretrained`` + tokenizer + ``run.json`` (which lists every file written), all-or-nothing.

    ``overwrite`` defaults to the run config's ``overwrite`` in ``manifest``.
    """
    if overwrite is None:
        overwrite = bool(manifest.get("config", {}).get("overwrite", False))
    output = expand_path(output, "output")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    safety.check_space(output, int(weights * 1.05) + 2**20, "the pruned model")
    with quiet_transformers(), atomic_directory(output, overwrite=overwrite) as scratch:
        model.save_pretrained(scratch)
        write_remote_code(model, scratch)  # per-layer shapes: code that loads them without prunekit
        safety.pause_point("save:mid")
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
        if extras is not None:  # more files in the same all-or-nothing folder (a GGUF export)
            extras(scratch)
        files = sorted(p.name for p in scratch.iterdir())
        (scratch / "run.json").write_text(json.dumps({**manifest, "files": files}, indent=2, default=str) + "\n")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (prunekit reports load problems itself, in one line)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _mismatch(path: str | os.PathLike, missing: Any, unexpected: Any, mismatched: Any = ()) -> UserError | None:
    """The one-line error for weights that do not match the config, or None when they match."""
    def name(key: Any) -> str:  # transformers reports a wrong shape as (name, shape saved, shape the config makes)
        if isinstance(key, (tuple, list)) and len(key) == 3:
            return f"{key[0]}: saved {list(key[1])}, config.json makes {list(key[2])}"
        return str(key)

    parts = [f"{what} {', '.join(sorted(map(name, keys))[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
    if not parts:
        return None
    return UserError(f"model: {path}: config.json does not match the weights ({'; '.join(parts)})")


def load_pruned(source: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu", *,
                revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                local_files_only: bool | None = None, device_map: str | dict | None = None,
                max_memory: dict | None = None, offload_folder: str | None = None):
    """Load a model prunekit saved, per-layer shapes included, from a folder, a hub id or a hub cache.

    Uniform shapes (every layer pruned alike) also load with ``AutoModelForCausalLM.from_pretrained``;
    per-layer shapes also load with ``from_pretrained(..., trust_remote_code=True)`` (the checkpoint
    carries its code), and here without running that code. ``source`` is a local folder or a hub id,
    looked up in ``cache_dir`` (default: the hub cache), offline when ``local_files_only`` or
    ``HF_HUB_OFFLINE`` is set. Checkpoints of older prunekit versions (only ``prunekit_layer_shapes``)
    load too. Weights that do not match the config (missing, unexpected, wrong shape) are a one-line UserError,
    never silently re-initialised. ``device_map``/``max_memory``/``offload_folder`` place the model with
    accelerate (see :mod:`prunekit.runtime.devices`) instead of moving it to ``device``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.adapters.base import LayerShape
    from prunekit.adapters.checkpoint import model_keys
    from prunekit.io.remote_code import checkpoint_folder
    from prunekit.io.templates.modeling_prunekit import resize_modules
    from prunekit.plugin.registry import get_registry

    hub = {k: v for k, v in {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only}.items()
           if v is not None}
    with quiet_transformers():
        config = AutoConfig.from_pretrained(source, **hub)
        if device_map is not None:
            from prunekit.runtime.devices import check_tied_placement

            check_tied_placement(config, device_map)
        modules, shapes = getattr(config, "prunekit_modules", None), getattr(config, "prunekit_layer_shapes", None)
        if not modules and not shapes:
            placed = ({"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
                      if device_map is not None else {})
            # ignore_mismatched_sizes: transformers would otherwise raise pointing at a load report that
            # quiet_transformers hides; its loading info names the tensors and _mismatch refuses them in one line
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **hub, **placed)
            error = _mismatch(source, info.get("missing_keys"), info.get("unexpected_keys"),
                              info.get("mismatched_keys"))
            if error:
                raise error
            return model if device_map is not None else model.to(device)
    path = checkpoint_folder(source, **hub)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    if modules:  # what the checkpoint's own loading code does
        resize_modules(model, modules)
        if hasattr(model.config, "auto_map"):  # this model is the base class; save_pruned writes fresh code
            del model.config.auto_map
    else:  # older checkpoints: per-layer widths only, resized by the family's adapter
        get_registry().adapter_for(model).rebuild([LayerShape(**s) for s in shapes])
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    state = model_keys(model, state)  # undo transformers' save-time renames (GPT-NeoX: embed_out)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor whose shape differs from the config's
        raise UserError(f"model: {path}: config.json does not match the weights "
                        f"({one_line(str(exc).strip().splitlines()[-1], 300)})") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if config.tie_word_embeddings else set()
    error = _mismatch(path, set(missing) - tied, unexpected)
    if error:
        raise error
    model.tie_weights()
    if device_map is not None:
        from prunekit.runtime.devices import dispatch

        return dispatch(model, device_map, max_memory, offload_folder).eval()
    return model.to(device).eval()


def save(result: PruneResult, out_dir: str | Path, *, metrics: dict[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Write the pruned model, its tokenizer and run.json into ``out_dir`` (all-or-nothing), the same files
    as ``prunekit run``. ``metrics`` (e.g. ``{"before": ..., "after": ...}``) replace ``result.metrics``."""
    out = Path(out_dir)
    check_output_dir(out, overwrite, result.source)
    if metrics is not None:
        result.metrics = metrics
    save_pruned(result.model, result.tokenizer, out, result.manifest(), overwrite=overwrite)
    return out
