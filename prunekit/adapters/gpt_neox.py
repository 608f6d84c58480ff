"""Adapter for GPT-NeoX / Pythia: fused, head-interleaved ``query_key_value``, biases, non-gated MLP.

Head ``h`` owns rows ``[3·h·d, 3·(h+1)·d)`` of ``query_key_value`` (its q, k and v, interleaved per
head) and columns ``[h·d, (h+1)·d)`` of ``dense``; an MLP channel owns a row (and bias entry) of
``dense_h_to_4h`` and a column of ``dense_4h_to_h``. Biases of removed rows go with them; the output
biases of ``dense``/``dense_4h_to_h`` act on the hidden size and stay. The head size is derived as
``hidden_size / num_attention_heads``, so a pruned config keeps the original widths and stores
per-layer shapes (reload with ``prunekit.load_pruned``).
"""

from __future__ import annotations

from prunekit.adapters.base import LayerShape
from prunekit.adapters.decoder import DecoderAdapter, cols, rows
from prunekit.adapters.layout import Slot
from prunekit.plugin.hookspecs import hookimpl


class GPTNeoXAdapter(DecoderAdapter):
    """GPT-NeoX and Pythia decoders (multi-head attention, parallel or sequential residual)."""

    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    attention_path = "attention"
    trace_mlp = True
    patch_rotary = False  # multi-head only: the rotary loop of GQA (torch-pruning #527) cannot occur
    kv_heads_field = None

    def names(self, i: int) -> tuple[str, str, str, str]:
        a, m = self.block(i, "attention"), self.block(i, "mlp")
        return f"{a}.query_key_value", f"{a}.dense", f"{m}.dense_h_to_4h", f"{m}.dense_4h_to_h"

    def layer_shape(self, i: int) -> LayerShape:
        _, dense, up, _ = (self.get(n) for n in self.names(i))
        n = dense.in_features // self.head_dim
        return LayerShape(n, n, up.out_features)

    def attention_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        qkv, dense, _, _ = self.names(i)
        hd = self.head_dim
        return [rows(qkv, "q", 3 * hd), cols(dense, "q", hd)]

    def mlp_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        _, _, up, down = self.names(i)
        return [rows(up, "channel", 1), cols(down, "channel", 1)]

    def config_accepts_uniform(self, shape: LayerShape) -> bool:
        return False  # the head size would be re-derived from the pruned head count


@hookimpl
def prunekit_register_adapters(register) -> None:
    register(GPTNeoXAdapter)
