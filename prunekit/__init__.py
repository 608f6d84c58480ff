"""prunekit: structural pruning of LLaMA-family causal LMs with pluggable importance methods."""

from prunekit.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
