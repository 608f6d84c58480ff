"""prunekit: structural pruning of LLaMA-family causal LMs with pluggable importance methods."""

from prunekit.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "load_pruned", "__version__"]


def load_pruned(path, dtype=None, device: str = "cpu", **hub):
    """Load a model prunekit saved (folder or hub id), per-layer shapes included (see ``prunekit.export``)."""
    from prunekit.export import load_pruned as _load

    return _load(path, dtype=dtype, device=device, **hub)
