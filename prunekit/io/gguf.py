"""Export a pruned LLaMA-family model to GGUF, the file format llama.cpp (and Ollama, LM Studio) runs.

Written with the ``gguf`` package from PyPI; the widths come from the loaded modules, never from the config.
Every layer having one shape gives the ``llama`` architecture, the one GGUF readers know best; per-layer
shapes give ``deci``, the architecture llama.cpp reads per-layer head counts and MLP widths for (it
builds ``llama`` layers from layer 0's values). What llama.cpp cannot represent is refused with a
one-line :class:`~prunekit.errors.UserError` naming the layer (see docs/gguf.md).

    prunekit.export_gguf(model, tokenizer, "pruned.gguf", type="f16")
    prunekit export pruned/ --format gguf --type q8_0 --output pruned-q8_0.gguf      # or q4_0
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from prunekit.core.gguf_types import GGUF_BLOCKS
from prunekit.errors import UserError
from prunekit.runtime.atomic import ordinary_file_mode

#: Model types whose decoder is LLaMA's (RMSNorm, rotary attention, gated SiLU MLP, no biases).
LLAMA_FAMILY = ("llama", "mistral")

#: --type → (tensor type of 2-D weights, file type recorded in general.file_type, block width).
TYPES: dict[str, tuple[str, str, int]] = {
    name: (name.upper(), file_type, GGUF_BLOCKS[name])
    for name, file_type in (("f32", "ALL_F32"), ("f16", "MOSTLY_F16"), ("q8_0", "MOSTLY_Q8_0"), ("q4_0", "MOSTLY_Q4_0"))
}

#: --type → the output matrix's tensor type where it is not the other weights' (``output.weight``, or
#: ``token_embd.weight`` when tied: llama.cpp multiplies by it too). llama.cpp's llama-quantize keeps that matrix
#: at Q6_K in a Q4_0 file, Q8_0 when the hidden size is not whole 256-blocks (SmolLM2's 576); the ``gguf``
#: package cannot write Q6_K, so Q8_0 always. An untied ``token_embd`` is Q4_0, as llama-quantize writes it.
OUTPUT_TYPES: dict[str, str] = {"q4_0": "Q8_0"}

#: The Split regex of LLaMA 3's tokenizer.json → the pre-tokenizer name llama.cpp (src/llama-vocab.cpp) knows it by.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEX_PRE = {LLAMA3_REGEX: "llama-bpe"}


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer as written: its widths read from the modules and how the MLP is padded."""

    index: int
    n_head: int
    n_head_kv: int
    n_ff: int  # channels of the pruned model
    pad_ff: int  # zero channels added (llama.cpp skips a layer whose MLP width is 0, attention output included)

    @property
    def written_ff(self) -> int:
        return self.n_ff + self.pad_ff


# -- checks and layer plans ------------------------------------------------------------------------------

def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` the config has (transformers renamed some fields across versions)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def rope_parameters(config: Any) -> dict:
    """Rotary settings as one dict (``rope_parameters`` in transformers 5, ``rope_theta``/``rope_scaling`` before)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", _config_value(config, "rope_theta", default=10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def check_config(config: Any) -> None:
    """Refuse a model whose decoder llama.cpp's llama/deci graph does not compute."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        raise UserError(f"gguf: model_type {model_type!r} is not supported; the GGUF exporter writes the LLaMA "
                        f"layout ({', '.join(LLAMA_FAMILY)})")
    if _config_value(config, "hidden_act", default="silu") != "silu":
        raise UserError(f"gguf: hidden_act {config.hidden_act!r}: llama.cpp's llama/deci MLP is SiLU-gated")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UserError(f"gguf: {flag}=true is not supported (llama.cpp's deci graph has no q/k/v biases)")
    if getattr(config, "sliding_window", None):
        raise UserError(f"gguf: sliding_window={config.sliding_window}: llama.cpp's llama/deci attention is "
                        "full; the outputs would differ past the window")
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"gguf: rope type {rope_type!r} is not supported (default, linear and llama3 are)")


def head_dim(model: nn.Module) -> int:
    """The attention head size (pruning removes whole heads, so it never changes)."""
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _heads(linear: nn.Linear | None, size: int, what: str, layer: int) -> int:
    """How many heads of ``size`` a projection's output holds; refuses a width that is not whole heads."""
    width = 0 if linear is None else linear.out_features
    if width % size:
        raise UserError(f"gguf: layer {layer}: {what} width {width} is not a multiple of the head size {size}")
    return width // size


def plan_layer(model: nn.Module, i: int, block: int) -> LayerPlan:
    """Layer ``i``'s widths, read from its modules, checked against what llama.cpp can run."""
    layer = model.model.layers[i]
    attn, mlp, hd = layer.self_attn, layer.mlp, head_dim(model)
    n_head, n_kv = _heads(attn.q_proj, hd, "q_proj", i), _heads(attn.k_proj, hd, "k_proj", i)
    if _heads(attn.v_proj, hd, "v_proj", i) != n_kv or attn.o_proj.in_features != n_head * hd:
        raise UserError(f"gguf: layer {i}: q/k/v/o projection widths disagree "
                        f"(q {attn.q_proj.out_features}, k {attn.k_proj.out_features}, "
                        f"v {attn.v_proj.out_features}, o in {attn.o_proj.in_features})")
    if n_head == 0:
        if i == 0:
            raise UserError("gguf: layer 0: attention fully pruned (0 query heads); llama.cpp reads the head size "
                            "only when layer 0 has heads, so layer 0 must keep at least one")
        n_kv = 0  # no query reads them: the layer is MLP-only (deci's attention-free layer)
    elif n_kv == 0:
        raise UserError(f"gguf: layer {i}: {n_head} query heads but no KV head (llama.cpp reads that as "
                        "Nemotron's linear attention)")
    elif n_head % n_kv:
        raise UserError(f"gguf: layer {i}: {n_head} query heads do not split evenly over {n_kv} KV heads")
    n_ff = mlp.gate_proj.out_features
    if mlp.up_proj.out_features != n_ff or mlp.down_proj.in_features != n_ff:
        raise UserError(f"gguf: layer {i}: gate/up/down widths disagree "
                        f"({n_ff}, {mlp.up_proj.out_features}, {mlp.down_proj.in_features})")
    return LayerPlan(i, n_head, n_kv, n_ff, pad_ff=block if n_ff == 0 else 0)


def check_blocks(plans: Sequence[LayerPlan], hidden: int, hd: int, type_name: str, block: int) -> None:
    """Refuse widths a block-quantized type cannot hold: each weight row must be whole blocks."""
    if block == 1:
        return
    hint = f"export with --type f16, or prune with selection round_to={block}"
    if hidden % block:
        raise UserError(f"gguf: hidden size {hidden} is not a multiple of {block}, which {type_name} needs; "
                        "export with --type f16")
    for p in plans:
        if (p.n_head * hd) % block:
            raise UserError(f"gguf: layer {p.index}: attention width {p.n_head} heads x {hd} = {p.n_head * hd} "
                            f"is not a multiple of {block}, which {type_name} needs (attn_output rows); "
                            "export with --type f16")
        if p.written_ff % block:
            raise UserError(f"gguf: layer {p.index}: MLP width {p.n_ff} is not a multiple of {block}, which "
                            f"{type_name} needs (ffn_down rows); {hint}")


def plan_model(model: nn.Module, block: int = 1) -> list[LayerPlan]:
    """Every layer's plan (checks the config first)."""
    check_config(model.config)
    return [plan_layer(model, i, block) for i in range(len(model.model.layers))]


def architecture(plans: Sequence[LayerPlan]) -> str:
    """``llama`` when every layer has one (non-empty) shape, else ``deci`` (reads widths per layer)."""
    shapes = {(p.n_head, p.n_head_kv, p.written_ff, p.pad_ff) for p in plans}
    return "llama" if len(shapes) == 1 and plans[0].n_head > 0 and plans[0].pad_ff == 0 else "deci"


# -- tensors ---------------------------------------------------------------------------------------------

def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from transformers' rotate-half layout to llama.cpp's pairwise rotary layout,
    per head. Without it position 0 still matches (no rotation there) and every later position is wrong."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(params: dict, dim: int) -> torch.Tensor:
    """LLaMA 3.1's per-frequency rotary divisors (``rope_freqs.weight``), from its rope parameters."""
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    low_band = torch.where(wavelen > old_ctx / low, torch.full_like(freqs, factor), mid)
    return torch.where(wavelen < old_ctx / high, torch.ones_like(freqs), low_band).float()


def layer_tensors(model: nn.Module, plan: LayerPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """GGUF name and value of each tensor of one layer, q/k permuted with this layer's own head counts."""
    layer, i = model.model.layers[plan.index], plan.index
    attn, mlp = layer.self_attn, layer.mlp
    if plan.n_head > 0:
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.attn_q.weight", permute_rotary(attn.q_proj.weight, plan.n_head)
        yield f"blk.{i}.attn_k.weight", permute_rotary(attn.k_proj.weight, plan.n_head_kv)
        yield f"blk.{i}.attn_v.weight", attn.v_proj.weight
        yield f"blk.{i}.attn_output.weight", attn.o_proj.weight
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    if plan.pad_ff:  # zero channels: silu(0) * 0 = 0, the layer's output is unchanged
        gate, up = gate.new_zeros(plan.pad_ff, gate.shape[1]), up.new_zeros(plan.pad_ff, up.shape[1])
        down = down.new_zeros(down.shape[0], plan.pad_ff)
    yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
    yield f"blk.{i}.ffn_gate.weight", gate
    yield f"blk.{i}.ffn_up.weight", up
    yield f"blk.{i}.ffn_down.weight", down


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output matrix is the token embedding (one tensor in the file, llama.cpp reuses it)."""
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def output_matrix_name(model: nn.Module) -> str:
    """The GGUF tensor llama.cpp multiplies the last hidden state by."""
    return "token_embd.weight" if tied_embeddings(model) else "output.weight"


def model_tensors(model: nn.Module, plans: Sequence[LayerPlan]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the GGUF file, in llama.cpp's names (the output matrix only when not tied)."""
    embed = model.get_input_embeddings().weight
    yield "token_embd.weight", embed
    params = rope_parameters(model.config)
    if params["rope_type"] == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(params, head_dim(model))
    for plan in plans:
        yield from layer_tensors(model, plan)
    yield "output_norm.weight", model.model.norm.weight
    if not tied_embeddings(model):
        yield "output.weight", model.get_output_embeddings().weight


def add_tensor(writer: Any, name: str, tensor: torch.Tensor, type_name: str) -> None:
    """Write one tensor: 1-D (norms, rope factors) as F32 as llama.cpp expects, 2-D in ``type_name``."""
    import gguf

    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if data.ndim == 1 or type_name == "F32":
        writer.add_tensor(name, data.astype(np.float32))
    elif type_name == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


# -- tokenizer -------------------------------------------------------------------------------------------

def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, recognised from tokenizer.json's structure."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        raise UserError(f"gguf: tokenizer: pre-tokenizer {kinds} has no llama.cpp equivalent the exporter knows")
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and byte_level.get("use_regex", True)):
        return "smollm"  # \p{N} split first, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        name = SPLIT_REGEX_PRE.get(regex)
        ignore_merges = bool(spec["model"].get("ignore_merges", False))
        isolated = parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
        if name is not None and isolated and ignore_merges == (name == "llama-bpe"):
            return name
    raise UserError(f"gguf: tokenizer: pre-tokenizer {kinds} has no llama.cpp equivalent the exporter knows")


def _token_types(tokenizer: Any, n_tokens: int) -> list[int]:
    """llama.cpp token types: special added tokens CONTROL, other added tokens USER_DEFINED, padding UNUSED."""
    import gguf

    types = [int(gguf.TokenType.NORMAL)] * n_tokens
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < n_tokens:
            types[token_id] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    return types


def tokenizer_fields(tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """What the GGUF needs of a fast byte-level BPE tokenizer (GPT-2 style: SmolLM2, LLaMA 3).

    Tokens padded with unused entries to the embedding's row count; SentencePiece-style tokenizers
    (byte fallback: LLaMA 2, Mistral 7B) and others are refused.
    """
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("gguf: tokenizer: only fast (tokenizer.json) tokenizers can be exported")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec.get("model", {}), (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise UserError(f"gguf: tokenizer: a {model.get('type')} tokenizer"
                        f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''} "
                        "is not supported; the exporter writes byte-level BPE (GPT-2 style) tokenizers")
    pre = _pre_tokenizer_name(spec)
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer is not None:
        raise UserError(f"gguf: tokenizer: normalizer {normalizer!r} has no llama.cpp equivalent")
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise UserError(f"gguf: tokenizer: {len(vocab)} tokens but the embedding has {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    for text, token_id in vocab.items():
        tokens[token_id] = text
    types = _token_types(tokenizer, n_vocab)
    for token_id in set(range(n_vocab)) - set(vocab.values()):
        types[token_id] = int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a").input_ids
    add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    add_eos = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id] and len(probe) > 1
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    template = getattr(tokenizer, "chat_template", None)
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges, "special": special,
            "add_bos": add_bos, "add_eos": add_eos, "chat_template": template if isinstance(template, str) else None}


def write_tokenizer(writer: Any, fields: dict[str, Any]) -> None:
    """Add the tokenizer's keys (tokenizer.ggml.*) to the writer."""
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for name, token_id in fields["special"].items():
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(int(token_id))
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])


# -- header and file -------------------------------------------------------------------------------------

def _per_layer(values: list[int], arch: str) -> int | list[int]:
    """deci: one INT32 per layer (always, so readers see the per-layer form); llama: the one value."""
    return values if arch == "deci" else values[0]


def write_hparams(writer: Any, model: nn.Module, plans: Sequence[LayerPlan], file_type: str) -> None:
    """The architecture keys: per-layer INT32 arrays for heads, KV heads and MLP width where they differ."""
    import gguf

    c, hd, arch = model.config, head_dim(model), writer.arch
    writer.add_name(Path(str(getattr(c, "_name_or_path", "") or "prunekit model")).name[:200])
    writer.add_block_count(len(plans))
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_feed_forward_length(_per_layer([p.written_ff for p in plans], arch))
    writer.add_head_count(_per_layer([p.n_head for p in plans], arch))
    writer.add_head_count_kv(_per_layer([p.n_head_kv for p in plans], arch))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    params = rope_parameters(c)
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    if params["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))


def check_exportable(model: nn.Module, type: str = "f16") -> list[LayerPlan]:
    """The per-layer plan of ``model`` as ``type``, or a one-line UserError naming what llama.cpp cannot take."""
    if type not in TYPES:
        raise UserError(f"gguf: --type {type!r} is not one of {', '.join(TYPES)}")
    check_config(model.config)
    block = TYPES[type][2]
    plans = plan_model(model, block)
    check_blocks(plans, int(model.config.hidden_size), head_dim(model), type, block)
    return plans


def gguf_name(type: str) -> str:
    """The file a run writes into its output folder for ``--export gguf``."""
    return f"model-{type}.gguf"


def export_gguf(model: nn.Module, tokenizer: Any, output: str | os.PathLike, *, type: str = "f16") -> Path:
    """Write ``model`` (a LLaMA-family causal LM, pruned or not) and its tokenizer as one GGUF file.

    ``type``: ``f32``, ``f16``, ``q8_0`` or ``q4_0`` for the 2-D weights (norms stay F32; with ``q4_0`` the
    output matrix is Q8_0, see :data:`OUTPUT_TYPES`). The file is written beside ``output`` and renamed into
    place at the end, so a failed export leaves nothing behind. Returns the path written.
    """
    import gguf

    plans = check_exportable(model, type)
    tensor_type, file_type, _ = TYPES[type]
    fields = tokenizer_fields(tokenizer, int(model.get_input_embeddings().weight.shape[0]))
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=f".{output.name}.partial-", dir=output.parent)
    os.fchmod(fd, ordinary_file_mode())  # readable like any other file, not mkstemp's 0600
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(scratch, architecture(plans))
        write_hparams(writer, model, plans, file_type)
        write_tokenizer(writer, fields)
        head, head_type = output_matrix_name(model), OUTPUT_TYPES.get(type, tensor_type)
        with torch.no_grad():
            for name, tensor in model_tensors(model, plans):
                add_tensor(writer, name, tensor, head_type if name == head else tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(scratch, output)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return output


def export_checkpoint(pruned_dir: str | os.PathLike, output: str | os.PathLike, *, type: str = "f16") -> Path:
    """Load a prunekit checkpoint (any per-layer shapes) with :func:`prunekit.load_pruned` and export it."""
    from transformers import AutoTokenizer

    from prunekit.io.export import load_pruned

    model = load_pruned(pruned_dir, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"gguf: {pruned_dir}: no loadable tokenizer ({str(exc).splitlines()[0][:160]})") from None
    return export_gguf(model, tokenizer, output, type=type)
