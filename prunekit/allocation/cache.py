"""A measuring allocator's result on disk, so a second run with the same model, scores and budget does not probe
the calibration loss again (the probe is the costliest stage of the default run).

The key is everything the counts depend on: the dense model's fingerprint (weights, config, tokenizer), the unit
scores, the groups and their parameter costs, the budget, the allocator and its options, ``round_to``, the seed
and the probe text (calibration source and seed), the package versions and the allocation code itself. A hit is
checked against the budget like a fresh result. Only runs that write files anyway use it (``prunekit run``:
:func:`on_disk`); the Python API writes nothing unless asked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from prunekit.core.versions import package_versions
from prunekit.runtime.assets import default_cache_root
from prunekit.runtime.atomic import write_json
from prunekit.runtime.fingerprint import _hash_tensor, code_fingerprint, model_fingerprint
from prunekit.runtime.switch import Switch

CODE_FILES = ("allocation/base.py", "allocation/builtin.py", "allocation/probe.py", "allocation/search.py",
              "allocation/plan.py", "core/budget.py", "core/select.py", "data/sources.py")
KEY_VERSIONS = ("prunekit", "torch", "transformers")


_DISK = Switch()
#: ``with on_disk():`` — within this block the disk cache of measured allocations is read and written.
on_disk = _DISK.on
#: Whether the disk cache is in use (inside :func:`on_disk`).
active = _DISK.active


def cache_key(model: torch.nn.Module, tokenizer: Any, scores: list[torch.Tensor], groups: list[Any],
              costs: list[int], settings: dict[str, Any]) -> str:
    """The entry name of one allocation: a hash of the model, the scores, the groups and ``settings`` (budget,
    allocator, options, seed, probe text)."""
    h = hashlib.sha256()
    for score in scores:
        _hash_tensor(h, score.detach().float().cpu())
    material = {"model": model_fingerprint(model, tokenizer), "scores": h.hexdigest(),
                "groups": [[g.name, g.kind, g.layer, g.n_units, g.n_parts] for g in groups], "costs": costs,
                "settings": settings, "versions": package_versions(KEY_VERSIONS),
                "code": code_fingerprint(CODE_FILES)}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Folder of the allocation entries: ``<root or prunekit's cache>/allocations``."""
    return Path(root) if root is not None else default_cache_root() / "allocations"


def read(key: str, root: str | os.PathLike | None = None) -> tuple[list[int], dict[str, Any]] | None:
    """The stored counts and record, or None (missing or unreadable entries are misses)."""
    try:
        entry = json.loads((cache_dir(root) / f"{key}.json").read_text())
        return [int(c) for c in entry["counts"]], dict(entry["info"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(key: str, counts: list[int], info: dict[str, Any], root: str | os.PathLike | None = None) -> None:
    """Store one allocation atomically; a cache that cannot be written is skipped (the run does not fail)."""
    folder = cache_dir(root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{key}.json", {"counts": counts, "info": info}, indent=None)
    except OSError:
        pass
