"""What the plugins registered: methods, adapters, groupers, recovery trainers, evaluators.

The host owns the names: a name registered twice is an error that names both providers, and
options are validated with the registering plugin's pydantic model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from prunekit.errors import UserError
from prunekit.plugins import PluginHost, get_host


def format_validation_error(prefix: str, exc: ValidationError) -> str:
    """One line: which field is wrong and why (pydantic's message, without the traceback)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{prefix}{loc}: {err['msg']}")
    return "; ".join(parts)


def validate_options(model_cls: type[BaseModel], values: dict, prefix: str) -> BaseModel:
    """Build an options model, turning validation errors into a one-line :class:`UserError`."""
    try:
        return model_cls(**values)
    except ValidationError as exc:
        raise UserError(format_validation_error(prefix, exc)) from None


@dataclass(frozen=True)
class MethodEntry:
    """A named method: an importance class plus preset option defaults."""

    name: str
    cls: type
    defaults: dict
    description: str
    provider: str

    def options(self, overrides: dict | None = None) -> BaseModel:
        return validate_options(self.cls.Options, {**self.defaults, **(overrides or {})}, "method_options.")

    def describe(self) -> dict:
        opts = self.cls.Options(**self.defaults)
        return {
            "name": self.name,
            "provider": self.provider,
            "description": self.description,
            "needs_calibration": self.cls.needs_calibration,
            "options": opts.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class NamedEntry:
    """A named implementation (grouper, recovery trainer, evaluator) and who provides it."""

    name: str
    impl: Any
    provider: str


@dataclass
class Registry:
    """Everything registered through the hooks, with duplicate names refused."""

    methods: dict[str, MethodEntry] = field(default_factory=dict)
    adapters: list[NamedEntry] = field(default_factory=list)
    groupers: dict[str, NamedEntry] = field(default_factory=dict)
    recovery: dict[str, NamedEntry] = field(default_factory=dict)
    evaluators: dict[str, NamedEntry] = field(default_factory=dict)
    allocators: dict[str, NamedEntry] = field(default_factory=dict)
    failed_plugins: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_host(cls, host: PluginHost) -> "Registry":
        reg = cls(failed_plugins=dict(host.failed))
        for provider, args, kw in host.collect("prunekit_register_importances"):
            reg._add_method(provider, *args, **kw)
        for provider, args, _ in host.collect("prunekit_register_adapters"):
            reg.adapters.append(NamedEntry(args[0].__name__, args[0], provider))
        for hook, table in (
            ("prunekit_register_groupers", reg.groupers),
            ("prunekit_register_recovery", reg.recovery),
            ("prunekit_register_evaluators", reg.evaluators),
            ("prunekit_register_allocators", reg.allocators),
        ):
            for provider, args, _ in host.collect(hook):
                name, impl = args
                _refuse_duplicate(table, name, provider, hook)
                table[name] = NamedEntry(name, impl, provider)
        return reg

    def _add_method(self, provider: str, name: str, cls: type, defaults: dict | None = None,
                    description: str | None = None) -> None:
        _refuse_duplicate(self.methods, name, provider, "prunekit_register_importances")
        doc = description or ((cls.__doc__ or "").strip().splitlines() or [""])[0]
        entry = MethodEntry(name, cls, dict(defaults or {}), doc, provider)
        entry.options()  # a preset whose defaults do not validate is the plugin's bug: fail at load
        self.methods[name] = entry

    def method(self, name: str) -> MethodEntry:
        if name not in self.methods:
            raise UserError(f"method: unknown method {name!r}; available: {', '.join(sorted(self.methods)) or 'none'}"
                            + self._failed_hint())
        return self.methods[name]

    def named(self, table: str, name: str) -> NamedEntry:
        entries: dict[str, NamedEntry] = getattr(self, table)
        if name not in entries:
            raise UserError(f"{table}: unknown name {name!r}; available: {', '.join(sorted(entries)) or 'none'}")
        return entries[name]

    def adapter_for(self, model: Any):
        model_type = getattr(model.config, "model_type", None)
        for entry in self.adapters:
            if model_type in entry.impl.model_types:
                return entry.impl(model)
        supported = sorted({t for e in self.adapters for t in e.impl.model_types})
        raise UserError(f"model: unsupported architecture {model_type!r}; supported: {', '.join(supported)}")

    def _failed_hint(self) -> str:
        if not self.failed_plugins:
            return ""
        return " (plugins that failed to load: " + ", ".join(f"{n}: {e}" for n, e in self.failed_plugins.items()) + ")"


def _refuse_duplicate(table: dict, name: str, provider: str, hook: str) -> None:
    if name in table:
        raise UserError(f"plugin conflict: {hook} name {name!r} registered by both "
                        f"{table[name].provider} and {provider}")


def get_registry(host: PluginHost | None = None) -> Registry:
    """Registry built from ``host`` (default: the process-wide plugin host)."""
    return Registry.from_host(host or get_host())


