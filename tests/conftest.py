"""Shared fixtures: tiny random-weight LLaMA models for every attention layout, always offline."""

from __future__ import annotations

import contextlib
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


WORDS = ("the of and to a in is that for it was on with as by at from he his an be are this which or "
         "had not but were they have one their has its new more who would been two also after when first "
         "said year market company stock price shares million billion percent trading new york about").split()


def make_tiny_tokenizer(vocab: int = 96):
    """An offline word-level tokenizer whose ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + list(dict.fromkeys(WORDS))
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:vocab])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny GQA 9q/3kv model with tokenizer, as a user would pass to --model."""
    path = tmp_path / "tiny-model"
    make_tiny_llama(9, 3, layers=4).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spinning costs 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def registered_plugin(module, name: str):
    """``module`` registered with prunekit's plugin host as its entry point would, unless the entry point already
    did; unregistered again afterwards when this registered it."""
    from prunekit.plugin.host import get_host

    host = get_host()
    if host.pm.is_registered(module):
        yield
        return
    host.pm.register(module, name=name)
    try:
        yield
    finally:
        host.pm.unregister(name=name)
