"""The ``fisher`` method (½·w²·F from per-sample gradients) and ``taylor -o variant=second``, against autograd by
hand."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from prunekit.adapters.grouping import GrouperOptions, build_groups
from prunekit.adapters.llama import LlamaAdapter
from prunekit.builtin.fisher import Fisher, FisherOptions
from prunekit.builtin.taylor import Taylor, TaylorOptions
from prunekit.core.groups import unit_scores
from prunekit.importance.base import ScoringContext
from prunekit.plugin.registry import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def context(calibration_ids) -> ScoringContext:
    """A fresh 9q/3kv tiny model (same weights every call), its groups and two batches of 2 sequences."""
    model = make_tiny_llama(9, 3)
    return ScoringContext(model, build_groups(model, LlamaAdapter(model), range(4), GrouperOptions()),
                          calibration_ids, seed=0)


def by_hand(ctx: ScoringContext) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean gradient and mean squared per-sequence gradient, one ``torch.autograd.grad`` per sequence."""
    params = ctx.params()
    names = list(params)
    sequences = [row for batch in ctx.batches for row in batch]
    mean = {n: torch.zeros_like(p) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for p in ctx.model.parameters():
        p.requires_grad_(True)
    for seq in sequences:
        ids = seq.unsqueeze(0)
        loss = ctx.model(input_ids=ids, labels=ids, use_cache=False).loss
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            mean[n] += g / len(sequences)
            fisher[n] += g * g / len(sequences)
    for p in ctx.model.parameters():
        p.grad = None
    return mean, fisher


def test_fisher_is_half_w_squared_times_per_sample_fisher(calibration_ids):
    ctx = context(calibration_ids)
    _, fisher = by_hand(context(calibration_ids))
    salience = Fisher(FisherOptions()).salience(ctx)
    params = ctx.params()
    assert set(salience) == set(params)
    for name, w in params.items():
        expected = 0.5 * w.detach() ** 2 * fisher[name]
        torch.testing.assert_close(salience[name], expected, rtol=1e-5, atol=1e-12)
    # the squares are per sequence: the batch gradient squared would be a different (smaller) thing
    mean, _ = by_hand(context(calibration_ids))
    name = next(iter(params))
    assert not torch.allclose(fisher[name], mean[name] ** 2)
    assert ctx.info["fisher"]["samples"] == 4


def test_fisher_unit_scores_use_the_shared_reduction(calibration_ids):
    ctx = context(calibration_ids)
    scores = Fisher(FisherOptions()).scores(ctx)
    _, fisher = by_hand(context(calibration_ids))
    hand = {n: 0.5 * w.detach() ** 2 * fisher[n] for n, w in ctx.params().items()}
    for got, want in zip(scores, unit_scores(ctx.groups, hand)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def test_fisher_is_deterministic(calibration_ids):
    first = Fisher(FisherOptions()).scores(context(calibration_ids))
    second = Fisher(FisherOptions()).scores(context(calibration_ids))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_taylor_second_keeps_llm_pruner_param_mix(calibration_ids):
    ctx = context(calibration_ids)
    mean, fisher = by_hand(context(calibration_ids))
    salience = Taylor(TaylorOptions(variant="second")).salience(ctx)
    for name, w in ctx.params().items():
        w = w.detach()
        torch.testing.assert_close(salience[name], (w * mean[name] - 0.5 * w ** 2 * fisher[name]).abs(),
                                   rtol=1e-4, atol=1e-10)


def test_fisher_is_registered_like_a_third_party_method():
    entry = get_registry().method("fisher")
    assert entry.cls is Fisher and entry.cls.needs_calibration
    assert entry.provider == "prunekit"  # the distribution that registered it, via its entry point
    with pytest.raises(Exception):
        entry.options({"variant": "second"})  # unknown options are refused
