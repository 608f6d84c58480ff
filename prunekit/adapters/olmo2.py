"""Adapter for OLMo 2 and OLMo 3: the LLaMA projections with q/k RMSNorm over the whole projection width.

``q_norm`` has ``num_attention_heads * head_dim`` weights (``k_norm`` the KV width) and normalises
the whole projection before the per-head reshape, so its entries shrink with the heads they scale.
Its root-mean-square is then taken over the kept heads only: the pruned layer equals the original
with the removed heads zeroed *and* the norm statistic computed over the kept heads (see
docs/architectures.md); it cannot equal the unpruned statistic, which needs the removed heads.
"""

from __future__ import annotations

from prunekit.adapters.base import LayerShape
from prunekit.adapters.decoder import norm
from prunekit.adapters.layout import Slot
from prunekit.adapters.llama import LlamaAdapter
from prunekit.plugin.hookspecs import hookimpl


class Olmo2Adapter(LlamaAdapter):
    """OLMo 2 / OLMo 3 decoders: post-norm blocks, q/k norms over the full projection width (OLMo 3 adds
    sliding-window layers, which pruning does not touch)."""

    model_types = ("olmo2", "olmo3")

    def attention_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        p, hd = self.block(i, "attention"), self.head_dim
        return super().attention_slots(i, shape) + [norm(f"{p}.q_norm", "q", hd), norm(f"{p}.k_norm", "kv", hd)]


@hookimpl
def prunekit_register_adapters(register) -> None:
    register(Olmo2Adapter)
