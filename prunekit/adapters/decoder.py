"""Shared machinery of decoder-only adapters: config sync and module rebuild driven by the block slots.

A family adapter subclasses :class:`DecoderAdapter`, names its blocks, reads its current widths
(``layer_shape``) and lists its slots; everything that resizes modules or rewrites the config is here.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, ClassVar, Iterator

from torch import nn

from prunekit.adapters.base import Adapter, LayerShape
from prunekit.adapters.layout import Slot, replace_linear, resize_norm, widths
from prunekit.io.templates.modeling_prunekit import LayerConfigView  # noqa: F401 (re-exported; checkpoints carry it)


def _elementwise_rotary(q, k, cos, sin, *args, unsqueeze_dim=1, **kwargs):
    """Trace-only stand-in for rotary embedding: same shapes, element-wise, no slice/negate/concat.

    torch-pruning loops forever on rotate_half under GQA with 2 query heads per KV head (its issue
    #527). Rotary values do not affect channel coupling when head dimensions are not pruned.
    """
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + q * sin, k * cos + k * sin


class DecoderAdapter(Adapter):
    """A decoder layer = one attention block + one MLP block, both described by slots."""

    attention_path: ClassVar[str] = "self_attn"
    mlp_path: ClassVar[str] = "mlp"
    # Replace the modeling module's apply_rotary_pos_emb while tracing (needed for 2:1 GQA).
    patch_rotary: ClassVar[bool] = True
    # Config fields holding the three widths (None: the family has no such field).
    heads_field: ClassVar[str] = "num_attention_heads"
    kv_heads_field: ClassVar[str | None] = "num_key_value_heads"
    intermediate_field: ClassVar[str] = "intermediate_size"

    def block(self, i: int, which: str) -> str:
        """Qualified name of layer ``i``'s attention (``which="attention"``) or MLP block."""
        return f"{self.layers_path}.{i}.{self.attention_path if which == 'attention' else self.mlp_path}"

    def get(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    # -- tracing --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        module = sys.modules[type(self.model).__module__]
        original = getattr(module, "apply_rotary_pos_emb", None)
        if not self.patch_rotary or original is None:
            yield
            return
        module.apply_rotary_pos_emb = _elementwise_rotary
        try:
            yield
        finally:
            module.apply_rotary_pos_emb = original

    # -- after pruning --------------------------------------------------------------------------
    def sync_layer(self, i: int, shape: LayerShape) -> None:
        """Point the modules' cached widths at the pruned ones (attributes they read at forward time)."""
        attn, mlp = self.get(self.block(i, "attention")), self.get(self.block(i, "mlp"))
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = shape.num_attention_heads // shape.num_key_value_heads
        for attr, value in (("num_heads", shape.num_attention_heads),
                            ("num_key_value_heads", shape.num_key_value_heads)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = shape.intermediate_size

    def config_accepts_uniform(self, shape: LayerShape) -> bool:
        """Whether ``from_pretrained`` rebuilds ``shape`` from plain config fields (it validates
        hidden_size % num_attention_heads; families deriving the head size from it never qualify)."""
        return self.config.hidden_size % shape.num_attention_heads == 0

    def sync_config(self) -> list[LayerShape]:
        shapes = [self.layer_shape(i) for i in range(self.num_layers)]
        c = self.config
        uniform = len(set(shapes)) == 1 and self.config_accepts_uniform(shapes[0])
        if uniform:
            c.head_dim = self.head_dim  # keep explicit: hidden_size // heads no longer holds
            setattr(c, self.heads_field, shapes[0].num_attention_heads)
            if self.kv_heads_field:
                setattr(c, self.kv_heads_field, shapes[0].num_key_value_heads)
            setattr(c, self.intermediate_field, shapes[0].intermediate_size)
            if hasattr(c, "prunekit_layer_shapes"):
                del c.prunekit_layer_shapes
        else:
            # The base sizes stay the original ones (they validate); prunekit.load_pruned reads these.
            c.prunekit_layer_shapes = [s.as_dict() for s in shapes]
        for i, shape in enumerate(shapes):
            self.sync_layer(i, shape)
        return shapes

    def layer_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        """Every slot of layer ``i`` (attention and MLP) at ``shape``."""
        return self.attention_slots(i, shape) + self.mlp_slots(i, shape)

    def rebuild(self, shapes: list[LayerShape]) -> None:
        """Resize every sliced Linear and norm of a freshly built model to ``shapes`` (generic over slots)."""
        for i, shape in enumerate(shapes):
            counts = {"q": shape.num_attention_heads, "kv": shape.num_key_value_heads,
                      "channel": shape.intermediate_size}
            sizes = widths(self.layer_slots(i, shape), counts)
            for (name, dim, kind), size in sizes.items():
                if kind == "norm":
                    resize_norm(self.model, name, size)
                    continue
                old = self.get(name)
                fan_in, fan_out = old.in_features, old.out_features
                replace_linear(self.model, name, size if dim == 1 else fan_in, size if dim == 0 else fan_out)
        self.sync_config()


def rows(module: str, role: str, width: int, **kw: Any) -> Slot:
    """Output rows (weight rows and bias entries) of an ``nn.Linear``."""
    return Slot(module, 0, role, width, **kw)  # type: ignore[arg-type]


def cols(module: str, role: str, width: int, **kw: Any) -> Slot:
    """Input columns of an ``nn.Linear``."""
    return Slot(module, 1, role, width, **kw)  # type: ignore[arg-type]


def norm(module: str, role: str, width: int, **kw: Any) -> Slot:
    """Entries of a norm whose width is the projection's (shrinks with the unit)."""
    return Slot(module, 0, role, width, kind="norm", **kw)  # type: ignore[arg-type]

