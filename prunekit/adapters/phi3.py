"""Adapter for Phi-3: fused ``qkv_proj`` and ``gate_up_proj``.

A query head owns its rows in the first block of ``qkv_proj``, a KV head its rows in the key and the
value blocks ([q | k | v] along the output); an MLP channel owns row ``c`` and row ``I + c`` of
``gate_up_proj`` ([gate | up]). The torch-pruning graph cannot split one Linear's rows this way, so
both blocks are pruned with its low-level Linear pruners from these slots.
"""

from __future__ import annotations

from prunekit.adapters.base import LayerShape
from prunekit.adapters.decoder import DecoderAdapter, LayerConfigView, cols, rows
from prunekit.adapters.layout import Slot
from prunekit.plugin.hookspecs import hookimpl


class Phi3Adapter(DecoderAdapter):
    """Phi-3 / Phi-3.5 / Phi-4-mini decoders (``Phi3ForCausalLM``)."""

    model_types = ("phi3",)
    trace_mlp = False

    def names(self, i: int) -> tuple[str, str, str, str]:
        a, m = self.block(i, "attention"), self.block(i, "mlp")
        return f"{a}.qkv_proj", f"{a}.o_proj", f"{m}.gate_up_proj", f"{m}.down_proj"

    def layer_shape(self, i: int) -> LayerShape:
        qkv, o, gate_up, _ = (self.get(n) for n in self.names(i))
        n_q = o.in_features // self.head_dim
        return LayerShape(n_q, (qkv.out_features // self.head_dim - n_q) // 2, gate_up.out_features // 2)

    def attention_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        qkv, o, _, _ = self.names(i)
        hd, n_q, n_kv = self.head_dim, shape.num_attention_heads, shape.num_key_value_heads
        return [rows(qkv, "q", hd), rows(qkv, "kv", hd, offset=n_q * hd),
                rows(qkv, "kv", hd, offset=(n_q + n_kv) * hd), cols(o, "q", hd)]

    def mlp_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        _, _, gate_up, down = self.names(i)
        return [rows(gate_up, "channel", 1), rows(gate_up, "channel", 1, offset=shape.intermediate_size),
                cols(down, "channel", 1)]

    def sync_layer(self, i: int, shape: LayerShape) -> None:
        """Phi-3 finds the key block at ``config.num_attention_heads * head_dim``: give each layer its width."""
        super().sync_layer(i, shape)
        self.get(self.block(i, "attention")).config = LayerConfigView(
            self.config, num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads)


@hookimpl
def prunekit_register_adapters(register) -> None:
    register(Phi3Adapter)
