"""Versions of Python and the packages a result depends on (run.json, cache keys)."""

from __future__ import annotations

import platform
from importlib import metadata

VERSIONED = ("prunekit", "torch", "transformers", "torch-pruning", "peft", "lm-eval", "datasets", "pluggy", "pydantic")


def package_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    """Python and the versions of the packages a result depends on (run.json, the metrics cache key)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
