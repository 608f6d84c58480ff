"""Shared fixtures: tiny random-weight LLaMA models for every attention layout, always offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# (query heads, kv heads): MHA, GQA 4:1, GQA 2:1 (torch-pruning issue #527), GQA 3:1 (issue #516)
LAYOUTS = {"mha4": (4, 4), "gqa8x2": (8, 2), "gqa4x2": (4, 2), "gqa9x3": (9, 3)}


def make_tiny_llama(n_q: int = 4, n_kv: int = 4, layers: int = 4, head_dim: int = 8, intermediate: int = 48,
                    vocab: int = 96, seed: int = 0, tie: bool = False):
    """A random-weight LlamaForCausalLM small enough to prune in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=72, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=head_dim, max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init is nearly uniform in scale; spread it so importance methods disagree meaningfully.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.2, 3.0))
    return model


@pytest.fixture(params=sorted(LAYOUTS))
def tiny_llama(request):
    n_q, n_kv = LAYOUTS[request.param]
    return make_tiny_llama(n_q, n_kv)


@pytest.fixture
def calibration_ids():
    """Two seeded batches of random token ids."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (2, 16), generator=g) for _ in range(2)]
