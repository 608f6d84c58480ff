"""The plugin contract: every hook prunekit calls, one docstring each.

Registration hooks receive a ``register`` callback (the style of ``llm`` and ``datasette``) so the host
owns names, duplicate detection and option validation. Lifecycle hooks let observers watch a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from prunekit.context import RunContext

hookspec = pluggy.HookspecMarker("prunekit")
hookimpl = pluggy.HookimplMarker("prunekit")

Register = Callable[..., None]


@hookspec
def prunekit_register_importances(register: Register) -> None:
    """Register importance methods: ``register(name, ImportanceClass, defaults=None, description=None)``.

    ``ImportanceClass`` subclasses :class:`prunekit.importance.Importance`; its nested pydantic
    ``Options`` model (unknown fields forbidden) declares the options a user may set. One class may be
    registered under several names with different ``defaults`` (a preset, e.g. ``moreau-gs``); the
    name is what ``prunekit run --method`` accepts.
    """


@hookspec
def prunekit_register_groupers(register: Register) -> None:
    """Register groupers: ``register(name, grouper_fn)`` where ``grouper_fn(model, adapter, options)``
    returns the list of :class:`prunekit.groups.PruningGroup` that every method scores."""


@hookspec
def prunekit_register_recovery(register: Register) -> None:
    """Register recovery trainers: ``register(name, RecoveryClass)`` with a nested ``Options`` model;
    ``RecoveryClass(options).recover(model, tokenizer, config)`` fine-tunes the pruned model in place
    (``config`` is the run's :class:`prunekit.config.RunConfig`) and returns a dict for run.json."""


@hookspec
def prunekit_register_adapters(register: Register) -> None:
    """Register architecture adapters: ``register(AdapterClass)``; the class attribute
    ``model_types`` lists the ``config.model_type`` values it handles."""


@hookspec
def prunekit_register_evaluators(register: Register) -> None:
    """Register evaluation suites: ``register(name, evaluator_fn)`` where
    ``evaluator_fn(model, tokenizer, options) -> dict[str, float]``."""


@hookspec
def prunekit_register_allocators(register: Register) -> None:
    """Register allocators: ``register(name, AllocatorClass)`` with a nested pydantic ``Options`` model
    (unknown fields forbidden); ``AllocatorClass(options).allocate(ctx)`` receives a
    :class:`prunekit.allocate.AllocationContext` (groups, unit scores, per-unit parameter costs, the
    budget, a calibration-loss probe) and returns how many units each group loses."""


@hookspec
def prunekit_after_scoring(context: "RunContext", scores: "list[torch.Tensor]") -> None:
    """Called once per run after every group was scored, before any unit is selected."""


@hookspec
def prunekit_after_pruning(context: "RunContext", model: Any) -> None:
    """Called once per run after the model was physically pruned and its config updated."""
