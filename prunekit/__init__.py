"""prunekit: structural pruning of LLaMA-family causal LMs with pluggable importance methods.

The Python API (docs/api.md) works on a model you already hold::

    result = prunekit.prune(model, tokenizer, method="moreau-gs", ratio=0.25)
    metrics = prunekit.evaluate(model, tokenizer)
    prunekit.save(result, "pruned/")

Everything but ``hookimpl`` is imported on first use, so ``import prunekit`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from prunekit.plugin.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "prune", "evaluate", "save", "load_model", "load_pruned", "PruneResult", "MethodInfo",
           "UserError", "EvaluationFailed", "__version__"]

_LAZY = {
    "prune": "prunekit.api", "save": "prunekit.api", "load_model": "prunekit.api", "PruneResult": "prunekit.api",
    "MethodInfo": "prunekit.api", "evaluate": "prunekit.api", "UserError": "prunekit.errors",
    "EvaluationFailed": "prunekit.errors",
}


def load_pruned(path, dtype=None, device: str = "cpu", **hub):
    """Load a model prunekit saved (folder or hub id), per-layer shapes included (see ``prunekit.io.export``)."""
    from prunekit.io.export import load_pruned as _load

    return _load(path, dtype=dtype, device=device, **hub)


def __getattr__(name: str) -> Any:
    """Import the public API on first use (``import prunekit`` stays cheap)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
