"""Activation statistics as a service of the scoring context: right numbers, one pass, hooks removed."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama

from prunekit.adapters.grouping import GrouperOptions, build_groups
from prunekit.adapters.llama import LlamaAdapter
from prunekit.importance.base import ScoringContext


def _ctx(model, batches):
    groups = build_groups(model, LlamaAdapter(model), range(2), GrouperOptions())
    return ScoringContext(model=model, groups=groups, batches=batches)


def test_statistics_match_an_independent_computation(calibration_ids):
    model = make_tiny_llama(9, 3, layers=2)
    stats = _ctx(model, calibration_ids).activation_stats()
    layer = model.model.layers[0]
    captured = {}
    handles = [layer.mlp.gate_proj.register_forward_hook(lambda m, a, out: captured.setdefault("gate", []).append(out)),
               layer.mlp.up_proj.register_forward_hook(lambda m, a, out: captured.setdefault("up", []).append(out))]
    with torch.no_grad():
        q_in = torch.cat([layer.input_layernorm(model.model.embed_tokens(b)).reshape(-1, 72) for b in calibration_ids])
        for b in calibration_ids:
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    down_in = torch.cat([(layer.mlp.act_fn(g) * u).reshape(-1, g.shape[-1])
                         for g, u in zip(captured["gate"], captured["up"])]).double()
    for name, x in (("model.layers.0.self_attn.q_proj", q_in.double()), ("model.layers.0.mlp.down_proj", down_in)):
        s = stats[name]
        assert s.count == x.shape[0] == sum(b.numel() for b in calibration_ids)
        torch.testing.assert_close(s.norm, x.norm(dim=0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.variance, x.var(0, unbiased=False), rtol=1e-5, atol=1e-6)
    expected = {s.module_name for g in _ctx(model, calibration_ids).groups for s in g.slices}
    assert set(stats) == expected  # every prunable Linear, nothing else


def test_one_pass_cached_and_hooks_removed(calibration_ids, monkeypatch):
    model = make_tiny_llama(4, 2, layers=2)
    model.train()
    ctx = _ctx(model, calibration_ids)
    calls = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = ctx.activation_stats()
    assert ctx.activation_stats() is first and len(calls) == len(calibration_ids)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model.training  # mode restored


def test_hooks_are_removed_when_the_pass_fails(calibration_ids):
    model = make_tiny_llama(4, 4, layers=2)
    ctx = _ctx(model, [calibration_ids[0], torch.full((1, 4), 10_000)])  # out-of-vocabulary ids: forward fails
    try:
        ctx.activation_stats()
    except (IndexError, RuntimeError):
        pass
    else:
        raise AssertionError("expected the forward pass to fail")
    assert all(not m._forward_pre_hooks for m in model.modules())
