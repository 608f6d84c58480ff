"""Adapter for Qwen3: the LLaMA layout plus per-head q/k RMSNorm.

``q_norm``/``k_norm`` have ``head_dim`` weights shared by every head (applied after the per-head
reshape), so removing heads leaves them whole: nothing to shrink, only the projections change.
"""

from __future__ import annotations

from prunekit.adapters.llama import LlamaAdapter
from prunekit.plugin.hookspecs import hookimpl


class Qwen3Adapter(LlamaAdapter):
    """Qwen3 dense decoder (sliding-window layers included): q/k norms over head_dim, shared by heads."""

    model_types = ("qwen3",)


@hookimpl
def prunekit_register_adapters(register) -> None:
    register(Qwen3Adapter)
