"""The architectures users bring: every adapter × every method × both attention units, on tiny random models.

Each model is built from its transformers config (no downloads). For each: the pruned model equals the
original with the removed units' closing columns (o_proj / dense / down_proj inputs) zeroed, and
save → reload gives identical logits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.adapters.grouping import GrouperOptions, apply_plan, build_groups
from prunekit.core.select import select
from prunekit.importance.base import ScoringContext
from prunekit.io.export import load_pruned
from prunekit.plugin.registry import get_registry
from prunekit.plugin.testing import tiny_sampler

VOCAB = 96
IDS = torch.arange(24).view(2, 12) % VOCAB
FAST = {"iterations": 2, "averaged": 1}
METHODS = {"magnitude": {}, "random": {}, "taylor": {}, "moreau": FAST, "moreau-gs": FAST,
           "moreau-reference": FAST, "moreau-gs-reference": FAST}
SLIDING = ["sliding_attention", "full_attention"]


def _config(arch: str):
    """A two-layer config of ``arch`` that exercises its peculiarities."""
    import transformers as t

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "qwen2":  # the LLaMA adapter's families: q/k/v biases, GQA 3:1
        return t.Qwen2Config(hidden_size=48, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2,
                             **common)
    if arch == "mistral":  # sliding window over every layer, GQA 2:1
        return t.MistralConfig(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                               sliding_window=4, **common)
    if arch == "qwen3":  # GQA 3:1, per-head q/k norms, one sliding-window layer
        return t.Qwen3Config(hidden_size=48, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2,
                             head_dim=8, use_sliding_window=True, sliding_window=4, layer_types=SLIDING, **common)
    if arch == "gemma2":  # head_dim 16 != 48/4, soft-capping, sliding windows, GQA 2:1 (torch-pruning #527)
        return t.Gemma2Config(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, sliding_window=4, layer_types=SLIDING, **common)
    if arch == "gemma3":  # head_dim 16 != 48/6, q/k norms over head_dim, sliding windows, GQA 3:1
        return t.Gemma3TextConfig(hidden_size=48, intermediate_size=40, num_attention_heads=6,
                                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                  sliding_window=4, layer_types=SLIDING, **common)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj, GQA 3:1
        return t.Phi3Config(hidden_size=48, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    if arch == "olmo2":  # q/k norms over the full projection width, GQA 2:1
        return t.Olmo2Config(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    if arch == "olmo3":  # OLMo 2's layout plus sliding-window layers
        return t.Olmo3Config(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                             sliding_window=4, layer_types=SLIDING, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             **common)
    if arch == "gpt_neox":  # fused interleaved query_key_value, biases everywhere, non-gated MLP, parallel residual
        return t.GPTNeoXConfig(hidden_size=48, intermediate_size=40, num_attention_heads=4, attention_bias=True,
                               use_parallel_residual=True, rope_parameters={"rope_type": "default",
                               "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, **common)
    raise ValueError(arch)


ARCHS = ["qwen2", "mistral", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "olmo3", "gpt_neox"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def make_model(arch: str, seed: int = 0):
    """A random-weight causal LM of ``arch``; weights, norms and biases spread so methods disagree."""
    from transformers import AutoModelForCausalLM

    config = _config(arch)
    config._attn_implementation = "eager"  # soft-capping is applied by the eager path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.2, 3.0))
            if p.dim() == 1:  # biases start at 0 and Gemma's norms at 0: make them matter
                p.add_(0.3 * torch.randn_like(p))
    return model


def prune(model, method: str, unit: str, layers: range | None = None, ratio: float = 0.5):
    adapter = get_registry().adapter_for(model)
    layers = layers if layers is not None else range(adapter.num_layers)
    groups = build_groups(model, adapter, layers, GrouperOptions(attention_unit=unit))
    entry = get_registry().method(method)
    ctx = ScoringContext(model=model, groups=groups, batches=[IDS], seed=3,
                         sampler=tiny_sampler([IDS], model.config.vocab_size))  # moreau-gs resamples
    scores = entry.cls(entry.options(METHODS[method])).scores(ctx)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return adapter, groups, select(groups, scores, ratio)


class KeptStatisticNorm(nn.Module):
    """Reference for norms that shrink with units (OLMo 2): the original norm, its statistic over kept entries."""

    def __init__(self, norm: nn.Module, kept: torch.Tensor):
        super().__init__()
        self.norm, self.kept = norm, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float()[..., self.kept].pow(2).mean(-1, keepdim=True)
        return (self.norm.weight * (x.float() * torch.rsqrt(variance + self.norm.variance_epsilon))).to(x.dtype)


def zeroed_reference(arch: str, groups, kept):
    """The original model with every removed unit's closing columns zeroed (its contribution removed)."""
    model = make_model(arch)
    for g, k in zip(groups, kept):
        removed = torch.tensor(sorted(set(range(g.n_units)) - set(k.tolist())), dtype=torch.long)
        if removed.numel() == 0:
            continue
        closing = next(s for s in g.slices if s.dim == 1)
        with torch.no_grad():
            model.get_submodule(closing.module_name).weight[:, g.channels_of(removed, closing)] = 0
        for s in g.followers:
            norm = model.get_submodule(s.module_name)
            keep = torch.ones(norm.weight.shape[0], dtype=torch.bool)
            keep[g.channels_of(removed, s)] = False
            parent, _, child = s.module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, KeptStatisticNorm(norm, keep.nonzero().flatten()))
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


# every method with both attention units; the authors'-code presets (same class, mode=reference) once each
CASES = [(m, u) for m in ("magnitude", "random", "taylor", "moreau", "moreau-gs") for u in ("heads", "kv_groups")]
CASES += [("moreau-reference", "kv_groups"), ("moreau-gs-reference", "heads")]


# Exactness depends on the architecture and the attention unit far more than on the method (which only
# changes scores): every case on the first architecture, both units with two methods on the others; the
# whole cross product runs under the ``slow`` marker (CI runs it).
FAST = {("magnitude", "heads"), ("magnitude", "kv_groups"), ("taylor", "heads"), ("moreau-gs", "kv_groups")}
EXACTNESS = [pytest.param(arch, method, unit, id=f"{arch}-{method}-{unit}",
                          marks=() if arch == ARCHS[0] or (method, unit) in FAST else pytest.mark.slow)
             for arch in ARCHS for method, unit in CASES]


@pytest.mark.parametrize("arch,method,unit", EXACTNESS)
def test_pruned_equals_zeroed_original(arch, method, unit):
    model = make_model(arch)
    adapter, groups, kept = prune(model, method, unit)
    reference = zeroed_reference(arch, groups, kept)
    before, original = model.num_parameters(), logits(model)
    apply_plan(model, adapter, groups, kept)
    shapes = adapter.sync_config()
    assert model.num_parameters() < before
    assert all(s.intermediate_size == 20 for s in shapes)
    pruned = logits(model)
    assert (pruned - logits(reference)).abs().max().item() <= 1e-5
    assert (pruned - original).abs().max().item() > 1e-2  # the comparison can tell a pruned model apart


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", [None, range(1, 2)], ids=["all-layers", "per-layer"])
def test_save_reload_identical(arch, layers, tmp_path):
    model = make_model(arch)
    adapter, groups, kept = prune(model, "taylor", "heads", layers=layers)
    apply_plan(model, adapter, groups, kept)
    shapes = adapter.sync_config()
    model.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path).eval()
    reloaded.config._attn_implementation = "eager"  # the runtime choice is not saved; compare like with like
    assert [get_registry().adapter_for(reloaded).layer_shape(i) for i in range(len(shapes))] == shapes
    assert torch.equal(logits(model), logits(reloaded))


@pytest.mark.parametrize("arch", ARCHS)
def test_slots_cover_every_sliced_module(arch):
    """Rebuilding an unpruned model at its own shapes changes no module: the slots describe full widths."""
    model = make_model(arch)
    adapter = get_registry().adapter_for(model)
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    adapter.rebuild([adapter.layer_shape(i) for i in range(adapter.num_layers)])
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_agrees_with_slots_where_traceable(arch):
    """Unfused MLPs are pruned through torch-pruning's graph, whose coupling must equal the adapter's slots."""
    model = make_model(arch)
    adapter = get_registry().adapter_for(model)
    groups = build_groups(model, adapter, range(adapter.num_layers), GrouperOptions())
    mlp = [g for g in groups if g.kind == "mlp"]
    assert all((g.graph_root is not None) == adapter.trace_mlp for g in mlp)
    assert adapter.trace_mlp == (arch != "phi3")  # fused gate_up_proj: low-level pruners only


def test_phi3_per_layer_widths_survive_deepcopy():
    """Phi-3 layers read their widths from a per-layer config view; copies keep working."""
    import copy

    model = make_model("phi3")
    adapter, groups, kept = prune(model, "magnitude", "heads", layers=range(0, 1))
    apply_plan(model, adapter, groups, kept)
    adapter.sync_config()
    assert model.config.num_attention_heads == 6  # per-layer shapes: the shared config keeps the base widths
    assert model.model.layers[0].self_attn.config.num_attention_heads == adapter.layer_shape(0).num_attention_heads == 2
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone), logits(model))


def test_phi3_fused_rows_follow_their_units():
    """A removed KV group takes its q rows, its k rows and its v rows out of the one fused qkv_proj."""
    model = make_model("phi3")
    adapter, groups, kept = prune(model, "magnitude", "kv_groups", layers=range(0, 1))
    attn = next(g for g in groups if g.kind == "attention")
    (qkv,) = [s for s in attn.slices if s.dim == 0]
    hd = adapter.head_dim
    assert qkv.channels.shape == (2, 3 * hd + 2 * hd)  # 3 query heads + its k head + its v head
    original = model.model.layers[0].self_attn.qkv_proj.weight.clone()
    apply_plan(model, adapter, groups, kept)
    g = kept[0].item()
    w = model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w[: 3 * hd], original[g * 3 * hd:(g + 1) * 3 * hd])
    assert torch.equal(w[3 * hd: 4 * hd], original[6 * hd + g * hd: 6 * hd + (g + 1) * hd])
    assert torch.equal(w[4 * hd:], original[8 * hd + g * hd: 8 * hd + (g + 1) * hd])


def test_biases_and_norms_shrink_with_units():
    model = make_model("qwen2")
    adapter, groups, kept = prune(model, "magnitude", "kv_groups")
    apply_plan(model, adapter, groups, kept)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias.shape == (3 * adapter.head_dim,) and attn.k_proj.bias.shape == (adapter.head_dim,)

    model = make_model("gpt_neox")
    adapter, groups, kept = prune(model, "magnitude", "heads")
    apply_plan(model, adapter, groups, kept)
    layer = model.gpt_neox.layers[0]
    assert layer.attention.query_key_value.bias.shape == (2 * 3 * adapter.head_dim,)
    assert layer.mlp.dense_h_to_4h.bias.shape == (20,)
    assert layer.mlp.dense_4h_to_h.bias.shape == (48,)  # acts on the hidden size: stays whole

    model = make_model("olmo2")
    adapter, groups, kept = prune(model, "magnitude", "kv_groups")
    apply_plan(model, adapter, groups, kept)
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.q_proj.weight.shape[:1]
    assert attn.k_norm.weight.shape == attn.k_proj.weight.shape[:1] == (adapter.head_dim,)


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_run_prunes_and_reloads(arch, tmp_path):
    """The whole run as a user starts it, on a saved model of each family (default layer range)."""
    import json

    from conftest import make_tiny_tokenizer

    from prunekit.cli import main

    model_dir, out = tmp_path / arch, tmp_path / "out"
    make_model(arch).save_pretrained(model_dir)
    make_tiny_tokenizer(VOCAB).save_pretrained(model_dir)
    # magnitude: no calibration corpus to load; every method is covered on these models above
    assert main(["run", "--no-eval", "--ratio", "0.5", "--method", "magnitude", "--model", str(model_dir),
                 "--output", str(out)]) == 0
    manifest = json.loads((out / "run.json").read_text())
    reloaded = load_pruned(out)
    assert reloaded.num_parameters() == manifest["reduction"]["params_after"] < manifest["reduction"]["params_before"]
    adapter = get_registry().adapter_for(reloaded)
    assert [adapter.layer_shape(i).as_dict() for i in range(adapter.num_layers)] == manifest["layer_shapes"]
    assert torch.isfinite(logits(reloaded)).all()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_per_head_qk_norms_are_shared_and_stay_whole(arch):
    """Qwen3/Gemma 3 q/k norms weigh head_dim entries used by every head: pruning heads leaves them as they are."""
    model = make_model(arch)
    attn = model.model.layers[0].self_attn
    q_norm = attn.q_norm.weight.clone()
    adapter, groups, kept = prune(model, "magnitude", "kv_groups")
    assert not any(g.followers for g in groups)
    apply_plan(model, adapter, groups, kept)
    assert torch.equal(attn.q_norm.weight, q_norm) and q_norm.shape == (adapter.head_dim,)


@pytest.mark.parametrize("arch", ARCHS)
def test_per_layer_checkpoint_loads_with_and_without_its_code(arch, tmp_path):
    """Layer 1 pruned (heads and MLP), layer 0 whole → prunekit.save → load_pruned and
    from_pretrained(trust_remote_code=True) both give the in-memory pruned model's logits."""
    import json

    from transformers import AutoModelForCausalLM

    import prunekit

    model = make_model(arch)
    result = prunekit.prune(model, None, method="magnitude", ratio=0.5, layers=(1, 2),
                            grouper={"attention_unit": "heads"})
    adapter = get_registry().adapter_for(model)
    whole, cut = adapter.layer_shape(0), adapter.layer_shape(1)
    assert cut.num_attention_heads < whole.num_attention_heads and cut.intermediate_size < whole.intermediate_size
    out = prunekit.save(result, tmp_path / "out")
    spec = json.loads((out / "config.json").read_text())["prunekit_modules"]
    assert not any(name.startswith(f"{adapter.layers_path}.0.") for part in spec.values() for name in part)
    expected = logits(model)
    mine = load_pruned(out).eval()
    mine.config._attn_implementation = "eager"
    theirs, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager",
                                                        output_loading_info=True)
    assert type(theirs).__name__ == "PrunekitForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (logits(mine) - expected).abs().max().item() <= 1e-5
    assert (logits(theirs.eval()) - expected).abs().max().item() <= 1e-5
