"""Adapter for the LLaMA layout: LLaMA, Vicuna, LLaMA-3 (GQA), SmolLM2, Mistral and Qwen2.

All share ``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``model.layers[i].mlp.{gate,up,down}_proj``.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch
from torch import nn

from prunekit.adapters.base import Adapter, AttentionNames, LayerShape, MlpNames
from prunekit.hookspecs import hookimpl

_MODELING_MODULES = {
    "llama": "transformers.models.llama.modeling_llama",
    "mistral": "transformers.models.mistral.modeling_mistral",
    "qwen2": "transformers.models.qwen2.modeling_qwen2",
}


def _elementwise_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """Trace-only stand-in for rotary embedding: same shapes, element-wise, no slice/negate/concat.

    torch-pruning loops forever on rotate_half under GQA with 2 query heads per KV head (its issue
    #527). Rotary values do not affect channel coupling when head dimensions are not pruned.
    """
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + q * sin, k * cos + k * sin


class LlamaAdapter(Adapter):
    """LLaMA-family decoder: gated MLP, (grouped-query) attention with rotary embedding."""

    model_types = tuple(_MODELING_MODULES)

    def attention_names(self, i: int) -> AttentionNames:
        p = f"{self.layers_path}.{i}.self_attn"
        return AttentionNames(q=f"{p}.q_proj", k=f"{p}.k_proj", v=f"{p}.v_proj", o=f"{p}.o_proj")

    def mlp_names(self, i: int) -> MlpNames:
        p = f"{self.layers_path}.{i}.mlp"
        return MlpNames(gate=f"{p}.gate_proj", up=f"{p}.up_proj", down=f"{p}.down_proj")

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        module = importlib.import_module(_MODELING_MODULES[self.config.model_type])
        original = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = _elementwise_rotary
        try:
            yield
        finally:
            module.apply_rotary_pos_emb = original

    def sync_config(self) -> list[LayerShape]:
        shapes = [self.layer_shape(i) for i in range(self.num_layers)]
        for layer, shape in zip(self.layers(), shapes):
            attn = layer.self_attn
            attn.num_key_value_groups = shape.num_attention_heads // shape.num_key_value_heads
            if hasattr(attn, "num_heads"):
                attn.num_heads = shape.num_attention_heads
            if hasattr(attn, "num_key_value_heads"):
                attn.num_key_value_heads = shape.num_key_value_heads
            if hasattr(layer.mlp, "intermediate_size"):
                layer.mlp.intermediate_size = shape.intermediate_size
        c = self.config
        c.head_dim = self.head_dim  # keep explicit: hidden_size // heads no longer holds
        # transformers validates hidden_size % num_attention_heads, so a uniform width that breaks it
        # is stored like per-layer shapes.
        uniform = len(set(shapes)) == 1 and c.hidden_size % shapes[0].num_attention_heads == 0
        if uniform:
            c.num_attention_heads = shapes[0].num_attention_heads
            c.num_key_value_heads = shapes[0].num_key_value_heads
            c.intermediate_size = shapes[0].intermediate_size
            if hasattr(c, "prunekit_layer_shapes"):
                del c.prunekit_layer_shapes
        else:
            # The base sizes stay the original ones (they validate); prunekit.load_pruned reads these.
            c.prunekit_layer_shapes = [s.as_dict() for s in shapes]
        return shapes

    def rebuild(self, shapes: list[LayerShape]) -> None:
        hd, hidden = self.head_dim, self.config.hidden_size
        for i, shape in enumerate(shapes):
            a, m = self.attention_names(i), self.mlp_names(i)
            sizes = {
                a.q: (hidden, shape.num_attention_heads * hd),
                a.k: (hidden, shape.num_key_value_heads * hd),
                a.v: (hidden, shape.num_key_value_heads * hd),
                a.o: (shape.num_attention_heads * hd, hidden),
                m.gate: (hidden, shape.intermediate_size),
                m.up: (hidden, shape.intermediate_size),
                m.down: (shape.intermediate_size, hidden),
            }
            for name, (fan_in, fan_out) in sizes.items():
                old = self.model.get_submodule(name)
                new = nn.Linear(fan_in, fan_out, bias=old.bias is not None, dtype=old.weight.dtype,
                                device=old.weight.device)
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, new)
        self.sync_config()


@hookimpl
def prunekit_register_adapters(register) -> None:
    register(LlamaAdapter)
