"""Adapter for Gemma 2 and Gemma 3 (text): the LLaMA projections with Gemma's extras.

``head_dim`` is independent of ``hidden_size / num_attention_heads`` (kept explicit in the config),
attention and final logits are soft-capped, layers alternate sliding-window and global attention,
and the extra pre/post feed-forward norms act on the hidden size, which pruning never changes.
Gemma 3's ``q_norm``/``k_norm`` have ``head_dim`` weights shared by heads: nothing to shrink.
"""

from __future__ import annotations

from prunekit.adapters.llama import LlamaAdapter
from prunekit.plugin.hookspecs import hookimpl


class GemmaAdapter(LlamaAdapter):
    """Gemma 2 / Gemma 3 text decoders (``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``)."""

    model_types = ("gemma2", "gemma3_text")


@hookimpl
def prunekit_register_adapters(register) -> None:
    register(GemmaAdapter)
