"""A disk cache for a model's evaluation metrics, keyed by what determines them.

The key hashes the model's weights (every parameter and buffer: name, dtype, shape, bytes), its
config, its tokenizer's vocabulary, the evaluation settings, the versions of prunekit, torch,
transformers and lm-eval, and the source of prunekit's evaluation and data modules. The same dense
model evaluated the same way on a second run is therefore read back instead of recomputed
(``prunekit run`` does this for the "before" metrics); any change to weights, settings, versions or
that code misses. Entries are JSON files under ``<prunekit cache>/metrics/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunekit.runtime.assets import default_cache_root
from prunekit.runtime.atomic import write_json
from prunekit.runtime.fingerprint import code_fingerprint, model_fingerprint

KEY_VERSIONS = ("prunekit", "torch", "transformers", "lm_eval")
# Config fields that say where or when a model was saved, not how it computes.
# what computes the metrics (perplexity, zero-shot, the suite) and the text they read
CODE_FILES = ("eval/perplexity.py", "eval/zero_shot.py", "core/evaluation.py", "eval/suite.py", "data/sources.py",
              "data/text.py", "data/tokens.py")






def cache_key(fingerprint: str, settings: dict[str, Any], device: str) -> str:
    """The entry name for a model fingerprint evaluated with ``settings`` on a device type."""
    from prunekit.core.versions import package_versions

    material = {"model": fingerprint, "settings": settings, "device": device,
                "versions": package_versions(KEY_VERSIONS),
                "code": code_fingerprint(CODE_FILES)}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Folder of the metric entries: ``<root or prunekit's cache>/metrics``."""
    return Path(root) if root is not None else default_cache_root() / "metrics"


def read(key: str, root: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The cached metrics for ``key``, or None (a missing or unreadable entry is a miss)."""
    path = cache_dir(root) / f"{key}.json"
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry.get("metrics") if isinstance(entry, dict) else None


def write(key: str, metrics: dict[str, Any], root: str | os.PathLike | None = None) -> Path:
    """Store ``metrics`` under ``key`` atomically (a crash leaves no half-written entry)."""
    folder = cache_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return write_json(folder / f"{key}.json", {"created": created, "metrics": metrics}, indent=None)


def cached_metrics(model: torch.nn.Module, tokenizer: Any, settings: dict[str, Any],
                   compute: Callable[[], dict[str, Any]], root: str | os.PathLike | None = None,
                   refresh: bool = False) -> dict[str, Any]:
    """``compute()``'s metrics for this model and ``settings``, read from the cache when present.

    The result carries ``cache``: ``{"hit": bool, "key", "file", "fingerprint_seconds"}`` so a caller can
    say where the figures came from. ``refresh`` recomputes and overwrites the entry.
    """
    from prunekit.runtime.devices import input_device, offloaded

    if offloaded(model):  # weights on 'meta' (accelerate offload): hashing them would read the whole model back
        return {**compute(), "cache": {"hit": False, "key": None, "file": None, "fingerprint_seconds": 0,
                                       "skipped": "offloaded model (device_map)"}}
    started = time.perf_counter()
    device = input_device(model).type
    key = cache_key(model_fingerprint(model, tokenizer), settings, device)
    hashing = round(time.perf_counter() - started, 2)
    path = cache_dir(root) / f"{key}.json"
    hit = None if refresh else read(key, root)
    if hit is not None:
        return {**hit, "cache": {"hit": True, "key": key, "file": str(path), "fingerprint_seconds": hashing}}
    metrics = compute()
    write(key, metrics, root)
    return {**metrics, "cache": {"hit": False, "key": key, "file": str(path), "fingerprint_seconds": hashing}}
