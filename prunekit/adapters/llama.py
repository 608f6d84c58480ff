"""Adapter for the LLaMA layout: LLaMA, Vicuna, LLaMA-3 (GQA), SmolLM2, Mistral and Qwen2.

All share ``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``model.layers[i].mlp.{gate,up,down}_proj``.
Families with the same projections and extra per-head details (Qwen3, Gemma, OLMo 2) subclass it.
"""

from __future__ import annotations

from prunekit.adapters.base import AttentionNames, LayerShape, MlpNames
from prunekit.adapters.decoder import DecoderAdapter, cols, rows
from prunekit.adapters.layout import Slot
from prunekit.plugin.hookspecs import hookimpl


class LlamaAdapter(DecoderAdapter):
    """LLaMA-family decoder: gated MLP, (grouped-query) attention with rotary embedding."""

    model_types = ("llama", "mistral", "qwen2")
    trace_mlp = True

    def attention_names(self, i: int) -> AttentionNames:
        p = self.block(i, "attention")
        return AttentionNames(q=f"{p}.q_proj", k=f"{p}.k_proj", v=f"{p}.v_proj", o=f"{p}.o_proj")

    def mlp_names(self, i: int) -> MlpNames:
        p = self.block(i, "mlp")
        return MlpNames(gate=f"{p}.gate_proj", up=f"{p}.up_proj", down=f"{p}.down_proj")

    def layer_shape(self, i: int) -> LayerShape:
        """Current widths of layer ``i``, read from the modules (correct after pruning too)."""
        a, m = self.attention_names(i), self.mlp_names(i)
        return LayerShape(
            num_attention_heads=self.get(a.q).out_features // self.head_dim,
            num_key_value_heads=self.get(a.k).out_features // self.head_dim,
            intermediate_size=self.get(m.gate).out_features,
        )

    def attention_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        a, hd = self.attention_names(i), self.head_dim
        return [rows(a.q, "q", hd), rows(a.k, "kv", hd), rows(a.v, "kv", hd), cols(a.o, "q", hd)]

    def mlp_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        m = self.mlp_names(i)
        return [rows(m.gate, "channel", 1), rows(m.up, "channel", 1), cols(m.down, "channel", 1)]


@hookimpl
def prunekit_register_adapters(register) -> None:
    register(LlamaAdapter)
