"""Exactness of structural pruning on every attention layout, for every built-in method."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LAYOUTS, make_tiny_llama
from transformers import AutoModelForCausalLM

from prunekit.adapters.grouping import GrouperOptions, apply_plan, build_dependency_graph, build_groups
from prunekit.adapters.llama import LlamaAdapter
from prunekit.core.select import select
from prunekit.importance.base import ScoringContext
from prunekit.io.export import load_pruned
from prunekit.plugin.registry import get_registry
from prunekit.plugin.testing import tiny_sampler

METHODS = [("magnitude", {}), ("magnitude", {"p": 1}), ("random", {}), ("taylor", {}),
           ("taylor", {"variant": "second"}), ("taylor", {"variant": "vector"}), ("fisher", {}),
           ("moreau", {"iterations": 2, "averaged": 1}), ("moreau-gs", {"iterations": 2, "averaged": 1}),
           ("moreau-gs-paper", {"iterations": 2, "averaged": 1}),
           ("moreau-gs-paper", {"iterations": 2, "averaged": 1, "mode": "reference"})]
IDS = torch.arange(24).view(2, 12) % 96


def zero_removed(model, groups, kept):
    """Reference: the original model with the removed units' inputs to o_proj / down_proj zeroed."""
    for g, k in zip(groups, kept):
        removed = torch.tensor(sorted(set(range(g.n_units)) - set(k.tolist())), dtype=torch.long)
        if removed.numel() == 0:
            continue
        closing = next(s for s in g.slices if s.dim == 1)  # o_proj / down_proj input columns
        with torch.no_grad():
            model.get_submodule(closing.module_name).weight[:, g.channels_of(removed, closing)] = 0
    return model


def prune(model, method, options, ratio=0.5, unit="heads", scope="local", calibration=None):
    adapter = LlamaAdapter(model)
    groups = build_groups(model, adapter, range(adapter.num_layers), GrouperOptions(attention_unit=unit))
    entry = get_registry().method(method)
    batches = calibration or [IDS]
    ctx = ScoringContext(model=model, groups=groups, batches=batches, seed=3, sampler=tiny_sampler(batches))
    scores = entry.cls(entry.options(options)).scores(ctx)
    for p in model.parameters():
        p.requires_grad_(False)
    kept = select(groups, scores, ratio, scope)
    return adapter, groups, kept


@pytest.mark.parametrize("method,options", METHODS, ids=[f"{m}-{o}" for m, o in METHODS])
@pytest.mark.parametrize("unit", ["heads", "kv_groups"])
def test_pruned_logits_equal_zeroed_original(tiny_llama, method, options, unit):
    model = tiny_llama
    adapter, groups, kept = prune(model, method, options, unit=unit)
    reference = zero_removed(make_tiny_llama(*_layout(model)), groups, kept)
    apply_plan(model, adapter, groups, kept)
    adapter.sync_config()
    with torch.no_grad():
        delta = (model(IDS).logits - reference(IDS).logits).abs().max().item()
    assert delta <= 1e-5
    assert model.num_parameters() < reference.num_parameters()


def _layout(model):
    return model.config.num_attention_heads, model.config.num_key_value_heads


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gqa_heads_mode_prunes_evenly_per_kv_group(layout):
    model = make_tiny_llama(*LAYOUTS[layout])
    n_q, n_kv = LAYOUTS[layout]
    adapter, groups, kept = prune(model, "magnitude", {}, ratio=0.5)
    apply_plan(model, adapter, groups, kept)
    shapes = adapter.sync_config()
    per_kv = n_q // n_kv
    expected_q = n_kv * (per_kv - round(0.5 * per_kv + 1e-9)) if per_kv > 1 else n_q - n_q // 2
    for shape, layer in zip(shapes, model.model.layers):
        assert shape.num_key_value_heads == (n_kv if n_q != n_kv else n_q - n_q // 2)
        assert shape.num_attention_heads == max(expected_q, shape.num_key_value_heads)
        assert layer.self_attn.num_key_value_groups == shape.num_attention_heads // shape.num_key_value_heads


def test_kv_group_mode_removes_whole_groups():
    model = make_tiny_llama(9, 3)
    adapter, groups, kept = prune(model, "magnitude", {}, ratio=0.34, unit="kv_groups")
    apply_plan(model, adapter, groups, kept)
    shapes = adapter.sync_config()
    assert {(s.num_attention_heads, s.num_key_value_heads) for s in shapes} == {(6, 2)}


def test_dependency_graph_builds_for_gqa_2to1(monkeypatch):
    """torch-pruning loops forever on rotary under 2:1 GQA; the adapter's trace-only rotary avoids it.

    transformers >= 5.25 makes ``apply_rotary_pos_emb`` a kernels ``Func`` module rather than a function:
    the stand-in must still be the one the attention calls while tracing, and the original (whatever its
    type) must be back afterwards.
    """
    from transformers.models.llama import modeling_llama

    import prunekit.adapters.decoder as decoder

    calls = []
    stand_in = decoder._elementwise_rotary
    monkeypatch.setattr(decoder, "_elementwise_rotary", lambda *a, **k: calls.append(1) or stand_in(*a, **k))
    original = modeling_llama.apply_rotary_pos_emb
    model = make_tiny_llama(4, 2)
    graph = build_dependency_graph(model, LlamaAdapter(model))
    assert graph.module2node  # traced
    assert len(calls) == model.config.num_hidden_layers  # the stand-in ran in every layer's attention
    assert modeling_llama.apply_rotary_pos_emb is original  # restored after tracing


def test_dependency_graph_needs_logits_only():
    """Tracing the raw output (with a KV cache tuple) is what crashes torch-pruning; logits-only works."""
    model = make_tiny_llama(4, 4)
    adapter = LlamaAdapter(model)
    assert isinstance(adapter.forward_for_trace(model, adapter.example_inputs()), torch.Tensor)


def test_global_scope_keeps_every_layer_nonempty():
    model = make_tiny_llama(4, 4)
    adapter, groups, kept = prune(model, "magnitude", {}, ratio=0.6, scope="global")
    assert all(len(k) >= 1 for k in kept)
    removed = sum(g.n_units - len(k) for g, k in zip(groups, kept) if g.kind == "mlp")
    assert removed == round(0.6 * sum(g.n_units for g in groups if g.kind == "mlp"))


def test_same_seed_same_mask():
    masks = []
    for _ in range(2):
        model = make_tiny_llama(8, 2)
        _, _, kept = prune(model, "taylor", {})
        masks.append([k.tolist() for k in kept])
    assert masks[0] == masks[1]


def test_uniform_shapes_reload_with_plain_from_pretrained(tmp_path):
    model = make_tiny_llama(8, 2)
    adapter, groups, kept = prune(model, "taylor", {}, ratio=0.25)
    apply_plan(model, adapter, groups, kept)
    adapter.sync_config()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reloaded(IDS).logits)


def test_per_layer_shapes_reload_with_load_pruned(tmp_path):
    model = make_tiny_llama(9, 3, tie=True)
    adapter = LlamaAdapter(model)
    groups = build_groups(model, adapter, range(1, 3), GrouperOptions())
    entry = get_registry().method("magnitude")
    kept = select(groups, entry.cls(entry.options()).scores(ScoringContext(model, groups, [])), 0.25)
    apply_plan(model, adapter, groups, kept)
    shapes = adapter.sync_config()
    assert len(set(shapes)) > 1
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["prunekit_layer_shapes"][0]["intermediate_size"] == 48
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reloaded(IDS).logits)
