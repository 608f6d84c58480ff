"""Conformance checks for prunekit method plugins, shipped as a pytest plugin (entry point ``pytest11``).

A plugin package runs them in its own CI without copying anything::

    def test_my_method_conforms(prunekit_conformance):
        prunekit_conformance("my-method")

For one registered method on a tiny random-weight LLaMA (9 query / 3 KV heads by default, the awkward
GQA ratio of SmolLM2) the check asserts that the method returns one finite float score per unit of every
group, gives bit-identical scores for the same seed, leaves the model's weights as it found them, and
that pruning by its scores removes exactly the selected units: the pruned model's logits equal the
original's with the removed units' input columns (o_proj, down_proj) zeroed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from prunekit.core.groups import PruningGroup
    from prunekit.plugin.registry import Registry


def tiny_llama(n_q: int = 9, n_kv: int = 3, layers: int = 3, head_dim: int = 8, intermediate: int = 48,
               vocab: int = 96, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` small enough to score and prune in well under a second.

    Weights are rescaled per element so importance methods disagree (plain init is nearly uniform).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=72, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=head_dim,
                         max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.2, 3.0))
    return model


def tiny_batches(vocab: int = 96, n_batches: int = 2, batch_size: int = 2, seq_len: int = 16,
                 seed: int = 0) -> list[torch.Tensor]:
    """Seeded calibration batches of random token ids, shaped as a run hands them to a method."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=gen) for _ in range(n_batches)]


def tiny_sampler(batches: list[torch.Tensor], vocab: int = 96):
    """A seeded random-token sampler shaped like ``batches``, for methods that draw fresh calibration text
    per step (``ScoringContext.sampler``)."""
    from prunekit.data.sampling import RandomTokenSampler

    return RandomTokenSampler.like(batches, vocab)


@dataclass
class Conformance:
    """What one check measured (returned so a plugin's own test can assert more)."""

    method: str
    n_groups: int
    n_units: list[int]
    removed: list[int]
    max_logit_diff: float
    info: dict = field(default_factory=dict)


class ConformanceError(AssertionError):
    """A method broke the contract; the message says which rule and where."""


def _score(entry: Any, options: Any, model: torch.nn.Module, groups: list[PruningGroup],
           batches: list[torch.Tensor], seed: int) -> tuple[list[torch.Tensor], dict]:
    from prunekit.importance.base import ScoringContext

    ctx = ScoringContext(model=model, groups=groups, batches=batches, seed=seed,
                         sampler=tiny_sampler(batches) if batches else None)
    try:
        scores = entry.cls(options).scores(ctx)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    return scores, ctx.info


def zero_removed_inputs(model: torch.nn.Module, groups: list[PruningGroup], kept: list[torch.Tensor]) -> None:
    """Zero, in place, the input columns (``dim == 1`` slices) that the removed units own."""
    import torch

    with torch.no_grad():
        for group, keep in zip(groups, kept):
            removed = torch.ones(group.n_units, dtype=torch.bool)
            removed[keep] = False
            units = removed.nonzero().flatten()
            for s in group.slices:
                if s.dim == 1 and units.numel():
                    model.get_submodule(s.module_name).weight[:, group.channels_of(units, s)] = 0


def check_method(name: str, registry: Registry | None = None, *, n_q: int = 9, n_kv: int = 3,
                 ratio: float = 0.34, seed: int = 0, options: dict | None = None, atol: float = 1e-4) -> Conformance:
    """Run every conformance rule on the registered method ``name``; raise :class:`ConformanceError` on a breach."""
    import torch

    from prunekit.adapters.grouping import apply_plan
    from prunekit.core.select import select
    from prunekit.plugin.registry import get_registry

    registry = registry or get_registry()
    entry = registry.method(name)
    opts = entry.options(options)
    model = tiny_llama(n_q, n_kv)
    groups = registry.resolve("groupers", "blocks", {}, "grouper.options.")(
        model, registry.adapter_for(model), range(model.config.num_hidden_layers))
    batches = tiny_batches() if entry.needs_calibration(opts) else []
    before = {k: v.clone() for k, v in model.state_dict().items()}

    scores, info = _score(entry, opts, model, groups, batches, seed)
    if not isinstance(scores, (list, tuple)) or len(scores) != len(groups):
        raise ConformanceError(f"{name}: expected a list of {len(groups)} score tensors (one per group), "
                               f"got {type(scores).__name__} of length "
                               f"{len(scores) if hasattr(scores, '__len__') else '?'}")
    for g, s in zip(groups, scores):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (g.n_units,) or not s.is_floating_point():
            raise ConformanceError(f"{name}: group {g.name} needs a float tensor of shape ({g.n_units},), got "
                                   f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
        if not torch.isfinite(s).all():
            raise ConformanceError(f"{name}: group {g.name} has non-finite scores")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise ConformanceError(f"{name}: scoring changed the model's weights ({changed[0]}, ...)")
    again, _ = _score(entry, opts, model, groups, batches, seed)
    for g, s, t in zip(groups, scores, again):
        if not torch.equal(s, t):
            raise ConformanceError(f"{name}: scores of {g.name} differ between two runs with seed {seed}")

    kept = select(groups, [s.detach().float() for s in scores], ratio, "local", 1)
    reference, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_removed_inputs(reference, groups, kept)
    adapter = registry.adapter_for(pruned)
    apply_plan(pruned, adapter, groups, kept)
    adapter.sync_config()
    for g, k in zip(groups, kept):
        for s in g.slices:
            width = pruned.get_submodule(s.module_name).weight.shape[s.dim]
            expected = (model.get_submodule(s.module_name).weight.shape[s.dim]
                        - (g.n_units - len(k)) * s.channels.shape[1])
            if width != expected:
                raise ConformanceError(f"{name}: {s.module_name} has {width} channels along dim {s.dim} after "
                                       f"pruning, expected {expected}")
    ids = tiny_batches(n_batches=1, seed=seed + 1)[0]
    with torch.no_grad():
        diff = float((pruned(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max())
    if diff > atol:
        raise ConformanceError(f"{name}: pruned model differs from the original with removed units zeroed "
                               f"(max |Δlogit| {diff:.3g} > {atol})")
    return Conformance(name, len(groups), [g.n_units for g in groups],
                       [g.n_units - len(k) for g, k in zip(groups, kept)], diff, info)


# ------------------------------------------------------------------------------ pytest plugin


@pytest.fixture
def prunekit_registry() -> Registry:
    """The registry of every installed prunekit plugin (the plugin under test included)."""
    from prunekit.plugin.registry import get_registry

    return get_registry()


@pytest.fixture
def prunekit_conformance(prunekit_registry: Registry) -> Callable[..., Conformance]:
    """``prunekit_conformance(method_name, **kw)`` runs :func:`check_method` against the installed plugins."""

    def _check(name: str, **kwargs: Any) -> Conformance:
        return check_method(name, prunekit_registry, **kwargs)

    return _check
