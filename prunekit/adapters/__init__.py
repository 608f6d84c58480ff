"""Architecture adapters: everything prunekit knows about one model family lives in one adapter."""

from prunekit.adapters.base import Adapter, LayerShape

__all__ = ["Adapter", "LayerShape"]
