"""LLaMA-shaped random-weight models of published sizes, built directly on a device without slow init.

The GPU check and the CPU scaling table prune models of real sizes (SmolLM2-135M/360M, Llama-3.2-1B,
LLaMA-2-7B, Llama-3-8B) whose weights do not matter: only shapes, memory and time do. Building one must
be cheap, so Hugging Face's weight initialisation is skipped and every tensor is filled once, in place,
on its own device (no CPU copy of a 7B model is ever made).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class Shape:
    """The architecture numbers of one LLaMA-family model (what a random-weight stand-in needs)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool = False
    rope_theta: float = 10000.0
    max_positions: int = 2048
    like: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def n_params(self) -> int:
        """Parameter count of a LlamaForCausalLM with this shape (embeddings counted once when tied)."""
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * self.hidden * 2 + self.hidden * kv * 2
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        embed = self.vocab * self.hidden
        return self.layers * per_layer + embed * (1 if self.tie else 2) + self.hidden

    def layer_params(self) -> int:
        """Prunable weights of one decoder layer (q/k/v/o and gate/up/down projections)."""
        kv = self.kv_heads * self.head_dim
        return self.hidden * self.hidden * 2 + self.hidden * kv * 2 + 3 * self.hidden * self.intermediate

    def config(self, dtype: torch.dtype = torch.float32) -> Any:
        """A ``LlamaConfig`` with these numbers (sdpa attention, no KV cache needed)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, max_position_embeddings=self.max_positions, rms_norm_eps=1e-5,
            tie_word_embeddings=self.tie, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            dtype=dtype,
        )

    def describe(self) -> dict[str, Any]:
        """The numbers as a plain dict (for JSON), with the parameter count."""
        return {**asdict(self), "head_dim": self.head_dim, "params": self.n_params()}


SHAPES: dict[str, Shape] = {s.name: s for s in (
    # for tests: builds and prunes in well under a second on one CPU core (GQA 4:2 like the big ones' 32:8)
    Shape("tiny", hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=256, like="test shape"),
    Shape("smollm2-135m", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tie=True,
          like="SmolLM2-135M"),
    Shape("smollm2-360m", hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49152, tie=True,
          like="SmolLM2-360M"),
    Shape("llama3.2-1b", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tie=True,
          rope_theta=500000.0, like="Llama-3.2-1B"),
    Shape("llama-7b", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
          max_positions=4096, like="LLaMA-2-7B"),
    Shape("llama3-8b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
          rope_theta=500000.0, max_positions=8192, like="Llama-3-8B"),
)}


def shape(name: str) -> Shape:
    """The named shape; ValueError listing the known names otherwise."""
    if name not in SHAPES:
        raise ValueError(f"shape: {name!r} is unknown (accepted: {', '.join(SHAPES)})")
    return SHAPES[name]


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Skip transformers' (and torch.nn.init's) weight initialisation where this transformers offers it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older 5.x / 4.x keep it in modeling_utils
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext  # type: ignore[assignment]
    with no_init_weights():
        yield


def build(spec: Shape | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
          seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """A random-weight ``LlamaForCausalLM`` of ``spec`` allocated on ``device`` in ``dtype`` (eval mode).

    Matrices are N(0, std²) and norm weights 1, drawn in place on the device from a generator seeded with
    ``seed``; rotary buffers are computed by the model's own constructor (float32, as usual).
    """
    from transformers import LlamaForCausalLM

    spec = shape(spec) if isinstance(spec, str) else spec
    device = torch.device(device)
    with _skip_init(), device:
        model = LlamaForCausalLM._from_config(spec.config(dtype), dtype=dtype)
    if spec.tie:  # skipping init_weights also skipped the tying it does
        model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            else:
                p.fill_(1.0)
    return model.eval()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct parameters in their own dtypes (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
