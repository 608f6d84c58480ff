"""A run config checked against the registry before any work is done."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from prunekit.allocation.plan import allocator_plan
from prunekit.core.config import RunConfig
from prunekit.core.validation import validate_options
from prunekit.plugin.registry import MethodEntry, NamedEntry, Registry, Resolved, get_registry


@dataclass(frozen=True)
class RunPlan:
    """A config checked against the registry before any work: the method and recovery trainer, validated."""

    method: MethodEntry
    options: BaseModel
    grouper: Resolved
    recovery: NamedEntry | None
    recovery_options: BaseModel | None
    repair: NamedEntry | None = None
    repair_options: BaseModel | None = None


def plan(config: RunConfig, registry: Registry | None = None) -> RunPlan:
    """Validate a config's method, method options, grouper and recovery (UserError naming the field) without
    touching a model."""
    registry = (registry or get_registry())
    entry = registry.method(config.method)
    options = entry.options(config.method_options)
    grouper = registry.resolve("groupers", config.grouper.name, config.grouper.options, "grouper.options.")
    allocator_plan(config, registry)  # an unknown allocator or a bad allocator option fails before any work
    recovery = None if config.recovery.method == "none" else registry.named("recovery", config.recovery.method)
    recovery_options = (validate_options(recovery.impl.Options, config.recovery.options, "recovery.options.")
                        if recovery else None)
    repair = None if config.repair.name == "none" else registry.named("repairers", config.repair.name)
    repair_options = (validate_options(repair.impl.Options, config.repair.options, "repair.options.")
                      if repair else None)
    return RunPlan(entry, options, grouper, recovery, recovery_options, repair, repair_options)
