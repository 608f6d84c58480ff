"""The plugin contract: every hook prunekit calls, one docstring each.

Registration hooks receive a ``register`` callback (the style of ``llm`` and ``datasette``) so the host
owns names, duplicate detection and option validation. Each docstring states the one ``register(...)``
signature the host accepts and how the core calls what was registered; ``tests/test_plugins.py`` checks
both against :mod:`prunekit.plugin.registry` and the call sites. Lifecycle hooks let observers watch a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from prunekit.pipeline.run import RunContext

hookspec = pluggy.HookspecMarker("prunekit")
hookimpl = pluggy.HookimplMarker("prunekit")

Register = Callable[..., None]


@hookspec
def prunekit_register_importances(register: Register) -> None:
    """Register importance methods: ``register(name, cls, defaults=None, description=None)``.

    ``cls`` subclasses :class:`prunekit.importance.base.Importance`; its nested pydantic ``Options`` model
    (unknown fields forbidden) declares the options a user may set. The core calls
    ``cls(options).scores(ctx)`` with a :class:`prunekit.importance.base.ScoringContext`. One class may be
    registered under several names with different ``defaults`` (a preset, e.g. ``moreau-gs``); the name
    is what ``prunekit run --method`` accepts. ``description`` defaults to the class docstring's first line.
    """


@hookspec
def prunekit_register_groupers(register: Register) -> None:
    """Register groupers: ``register(name, fn, options=None, description=None)``.

    The core calls ``fn(model, adapter, layers, options)``, which returns the list of
    :class:`prunekit.core.groups.PruningGroup` that every method scores; a run selects it with
    ``grouper: {name: ..., options: {...}}``. ``options`` is the grouper's pydantic model (the run's
    options are validated by it and handed over as an instance); without one they arrive as a dict.
    """


@hookspec
def prunekit_register_recovery(register: Register) -> None:
    """Register recovery trainers: ``register(name, cls, description=None)``.

    ``cls`` has a nested pydantic ``Options`` model; the core calls
    ``cls(options).recover(model, tokenizer, config)``, which fine-tunes the pruned model in place
    (``config`` is the run's :class:`prunekit.core.config.RunConfig`) and returns a dict for run.json.

    The teacher contract: a class attribute ``needs_teacher = True`` makes the core call
    ``cls(options).recover(model, tokenizer, config, teacher=teacher)`` instead, ``teacher`` being a model with the
    pruned model's vocabulary in the same dtype, in eval mode, with ``requires_grad`` off: in ``prunekit run`` /
    ``prunekit.prune`` the untouched dense copy taken just before pruning (one copy, shared with a repair that
    sets ``needs_dense``, released when recovery returns); in ``prunekit recover`` the model the checkpoint's
    run.json records as its source. An option named ``teacher`` (a folder or hub id), when the options declare
    one and it is set, names another teacher instead. ``recover`` must leave the teacher unchanged.
    """


@hookspec
def prunekit_register_repairers(register: Register) -> None:
    """Register repair steps: ``register(name, cls, description=None)``.

    ``cls`` has a nested pydantic ``Options`` model; the core calls ``cls(options).repair(ctx)`` with a
    :class:`prunekit.pipeline.repair.RepairContext` after pruning and before recovery. A repair updates the kept
    weights of ``ctx.model`` in place without training and returns a dict for run.json. A class attribute
    ``needs_dense = True`` asks the core to keep an untouched copy of the model from before pruning
    (``ctx.dense``); ``ctx.calibration(n_samples, seq_len)`` draws seeded token batches of the repair text.
    """


@hookspec
def prunekit_register_adapters(register: Register) -> None:
    """Register architecture adapters: ``register(cls)``.

    ``cls`` subclasses :class:`prunekit.adapters.base.Adapter`; its ``model_types`` lists the
    ``config.model_type`` values it handles, and the core calls ``cls(model)``.
    """


@hookspec
def prunekit_register_evaluators(register: Register) -> None:
    """Register evaluation suites: ``register(name, fn, options=None, description=None)``.

    The core calls ``fn(model, tokenizer, options)``, which returns ``dict[str, float]``, for each name in
    the run's ``evaluation.evaluators`` (validated by ``options``, the evaluator's pydantic model, when
    one is registered; otherwise a plain dict).
    """


@hookspec
def prunekit_register_allocators(register: Register) -> None:
    """Register allocators: ``register(name, cls, description=None)``.

    ``cls`` has a nested pydantic ``Options`` model; the core calls ``cls(options).allocate(ctx)`` with a
    :class:`prunekit.allocation.base.AllocationContext` (groups, unit scores, per-unit parameter costs, the
    budget, a calibration-loss probe), which returns how many units each group loses.
    """


@hookspec
def prunekit_after_scoring(context: RunContext, scores: list[torch.Tensor]) -> None:
    """Called once per run after every group was scored, before any unit is selected.

    ``context`` is the run's :class:`prunekit.pipeline.run.RunContext`; ``scores`` holds one tensor per group.
    """


@hookspec
def prunekit_after_pruning(context: RunContext, model: Any) -> None:
    """Called once per run after the model was physically pruned and its config updated."""
