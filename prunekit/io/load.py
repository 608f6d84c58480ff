"""Loading a model to prune: a local folder, a hub id or the embedded default model, per-layer checkpoints included.

What ``--model`` names is checked before anything is read (:func:`model_source`): a path that does not exist,
a file, a symbolic-link loop or an empty string is named as such, never reported as an invalid hub id. The
tokenizer is loaded and checked on its own (:func:`load_tokenizer`), so its errors name its files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch

from prunekit.core.validation import check_tokenizer_fits
from prunekit.errors import UserError, one_line
from prunekit.importance.finite import check_weights_finite
from prunekit.io.export import load_pruned
from prunekit.runtime.paths import expand_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A hub id: NAME or NAMESPACE/NAME, letters, digits, '-', '_', '.', not starting with '-' or '.'.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
# Files a tokenizer may be saved as; the JSON ones are checked one by one so an error names the file.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")
TOKENIZER_FILES = (*TOKENIZER_JSON, "tokenizer.model", "spiece.model", "vocab.txt", "merges.txt")


def _is_hub_id(text: str) -> bool:
    """Whether ``text`` can only be meant as a hub id: the hub's syntax, and nothing path-like about it."""
    return bool(HUB_ID.fullmatch(text)) and not text.startswith((".", "~")) and not text.endswith(".json")


def model_source(source: str | os.PathLike, field: str = "model") -> str:
    """``source`` checked before anything is loaded: an existing model folder (``~`` expanded) or a hub id.

    A missing path, a file, a symbolic-link loop, a dangling link, an unreadable folder, a folder without
    ``config.json`` or an empty string is a one-line :class:`UserError` that says which.
    """
    text = os.fspath(source)
    if not text.strip():
        raise UserError(f"{field}: empty; give a model folder or a hub id (or leave --model out for the embedded "
                        f"model)")
    path = expand_path(text, field)
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{field}: {text}: symbolic link loop (a link points, through others, at itself)") \
                from None
        if exc.errno == errno.ENAMETOOLONG:
            raise UserError(f"{field}: {text}: file name too long") from None
        if exc.errno == errno.EACCES:
            raise UserError(f"{field}: {text}: permission denied (cannot look inside a folder on the way)") from None
        if os.path.islink(path):
            raise UserError(f"{field}: {text} is a symbolic link to {os.readlink(path)}, which does not exist") \
                from None
        if _is_hub_id(text):
            return text  # not a local folder: a hub id (load_model says when the hub is offline)
        raise UserError(f"{field}: {text}: no such directory") from None
    if not stat.S_ISDIR(info.st_mode):
        part_of_model = path.name == "config.json" or path.suffix in (".safetensors", ".bin", ".gguf")
        raise UserError(f"{field}: {text} is a file, expected a model folder (the folder holding config.json"
                        f"{', e.g. ' + str(path.parent) if part_of_model else ''})")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{field}: {text}: permission denied (cannot read the folder)")
    if not (path / "config.json").is_file():
        entries = sorted(p.name for p in path.iterdir())
        listing = f"it holds {', '.join(entries[:4])}{' ...' if len(entries) > 4 else ''}" if entries else "it is empty"
        raise UserError(f"{field}: {text} has no config.json, so it is not a saved model folder ({listing}); "
                        f"give the folder save_pretrained wrote")
    return str(path)


def load_tokenizer(source: str, field: str = "tokenizer") -> Any:
    """The tokenizer saved with ``source``; errors name the file (bad JSON, not UTF-8, no tokenizer files)."""
    from transformers import AutoTokenizer

    folder = Path(source)
    present: list[str] = []
    if folder.is_dir():
        present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
        for name in TOKENIZER_JSON:
            if name not in present:
                continue
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{field}: {folder / name} is not UTF-8 text") from None
            except ValueError as exc:
                raise UserError(f"{field}: {folder / name} is not valid JSON ({exc})") from None
            except OSError as exc:
                raise UserError(f"{field}: cannot read {folder / name} ({exc.strerror})") from None
        if not {"tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt"} & set(present):
            raise UserError(f"{field}: {folder} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json "
                            f"+ merges.txt); save it beside the model with tokenizer.save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        files = f" ({', '.join(present)})" if present else ""
        reason = f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError) and exc.args else one_line(exc)
        raise UserError(f"{field}: cannot load the tokenizer of {source}{files}: {reason}") from None


def load_model(source: str | None = None, dtype: str = "float32", device: str = "cpu", *,
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               offload_folder: str | Path | None = None) -> tuple[Any, Any, str]:
    """Model (eval mode), tokenizer and resolved source from a local path, a hub id or (``None``) the
    embedded default model; prunekit checkpoints with per-layer shapes included. ``device`` is cpu, cuda or
    cuda:N; ``device_map``/``max_memory``/``offload_folder`` place it with accelerate instead (docs/devices.md)."""
    from prunekit.data.sources import hub_offline
    from prunekit.runtime.devices import placement

    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not supported (accepted: {', '.join(DTYPES)})")
    if source is None:
        from prunekit.runtime.assets import default_model_dir

        source = str(default_model_dir())
    source = model_source(source)
    where = placement(device, device_map, max_memory, offload_folder)
    local = Path(source).is_dir()
    try:
        model = load_pruned(source, dtype=DTYPES[dtype], **where)
    except UserError:
        raise
    except Exception as exc:  # corrupt/truncated weights, bad JSON, unknown type: all "cannot load"
        if not local and hub_offline():
            raise UserError(f"model: {source!r} is not a local folder (no such directory) and not in the hub cache; "
                            f"offline (HF_HUB_OFFLINE) only a local folder or a cached hub id loads") from None
        hint = "" if local else " (a hub id; offline, pass a local directory)"
        raise UserError(f"model: cannot load {source!r}: {one_line(exc)}{hint}") from None
    tokenizer = load_tokenizer(source)
    check_tokenizer_fits(model, tokenizer, source)  # ids past the embedding: named now, not an IndexError later
    check_weights_finite(model, source)  # NaN/Inf weights: named now, not as a NaN model later
    return model.eval(), tokenizer, source
