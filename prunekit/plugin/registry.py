"""What the plugins registered: methods, adapters, groupers, repairs, recovery trainers, evaluators.

The host owns the names. Each ``prunekit_register_*`` hook fills one *table*; a table is one line in
:data:`TABLES` (the hook, and the function that checks a ``register(...)`` call and builds the entry),
so adding a kind of component is a one-line change. A plugin whose ``register`` call is wrong (bad
arguments, a name outside the naming rule, options whose defaults do not validate) is disabled as a
whole, with a one-line warning; a name registered by two plugins is *contested*: neither is usable
under it, asking for it is an error naming both providers, and everything else keeps working.
"""

from __future__ import annotations

import inspect
import re
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from prunekit.core.validation import format_validation_error, validate_options
from prunekit.errors import UserError
from prunekit.plugin.host import PluginFailure, PluginHost, get_host
from prunekit.plugin.presets import merge_preset

GROUPER_CALL = ("model", "adapter", "layers", "options")  # how the core calls a grouper
EVALUATOR_CALL = ("model", "tokenizer", "options")  # how the core calls an evaluator
NAME_RULE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
NAME_RULE_TEXT = "lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"


class PluginError(Exception):
    """A plugin's own bug found while registering (never the user's input): the plugin gets disabled."""






def check_options_model(model_cls: Any, defaults: dict | None = None, what: str = "options") -> None:
    """A registered options model must be a pydantic model whose defaults (and preset ``defaults``) validate.

    pydantic does not validate field defaults, so a default of the wrong type would otherwise surface as
    a TypeError deep inside a run; here it is the plugin's error, found at load.
    """
    if not (isinstance(model_cls, type) and issubclass(model_cls, BaseModel)):
        raise PluginError(f"{what} must be a pydantic BaseModel subclass, got {model_cls!r}")
    try:
        built = model_cls(**(defaults or {}))
        every = {name: getattr(built, name) for name in type(built).model_fields}
        model_cls.model_validate(merge_preset(model_cls, every, defaults or {}))
    except ValidationError as exc:
        raise PluginError(f"{what} defaults do not validate: "
                          + format_validation_error(f"{model_cls.__name__}.", exc)) from None


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RULE.match(name):
        raise PluginError(f"name {name!r} breaks the naming rule ({NAME_RULE_TEXT})")
    return name


def _first_doc_line(obj: Any) -> str:
    return ((inspect.getdoc(obj) or "").strip().splitlines() or [""])[0]


def _check_callable(fn: Any, params: tuple[str, ...], what: str) -> None:
    """``fn`` can be called as ``fn(*params)`` (the call the core makes)."""
    if not callable(fn):
        raise PluginError(f"{what} must be callable, got {fn!r}")
    try:
        inspect.signature(fn).bind(*params)
    except TypeError:
        raise PluginError(f"{what} {getattr(fn, '__name__', fn)!r} cannot be called as "
                          f"{what}({', '.join(params)})") from None
    except ValueError:  # builtins without a signature: trust them
        pass


# ---------------------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class MethodEntry:
    """A named method: an importance class plus preset option defaults."""

    name: str
    cls: type
    defaults: dict
    description: str
    provider: str
    plugin: str = ""

    def options(self, overrides: dict | None = None) -> BaseModel:
        # a field the user sets replaces the preset's alternative to it (rho vs rho_relative): prunekit.plugin.presets
        values = merge_preset(self.cls.Options, self.defaults, overrides or {})
        return validate_options(self.cls.Options, values, "method_options.")

    def needs_calibration(self, options: BaseModel | None = None) -> bool:
        """Whether this method with ``options`` reads calibration batches (may depend on the options)."""
        return bool(self.cls(options or self.options()).requires_calibration())

    def describe(self) -> dict:
        opts = self.cls.Options(**self.defaults)
        return {
            "name": self.name,
            "provider": self.provider,
            "description": self.description,
            "needs_calibration": self.needs_calibration(opts),
            "options": opts.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class NamedEntry:
    """A named implementation (grouper, recovery trainer, evaluator, adapter) and who provides it.

    ``options_model`` validates the options a run gives it; ``None`` means they reach ``impl`` as a plain dict.
    """

    name: str
    impl: Any
    provider: str
    plugin: str = ""
    options_model: type[BaseModel] | None = None
    description: str = ""

    def options(self, values: dict | None, prefix: str) -> Any:
        """The validated options (a model instance), or the dict itself when no model was registered."""
        if self.options_model is None:
            return dict(values or {})
        return validate_options(self.options_model, dict(values or {}), prefix)


@dataclass(frozen=True)
class Resolved:
    """A registered component with its validated options, as a run uses it and records it in run.json."""

    entry: NamedEntry
    options: Any

    def __call__(self, *args: Any) -> Any:
        """Call the component with the core's arguments and its options last (groupers, evaluators)."""
        return self.entry.impl(*args, self.options)

    def describe(self) -> dict[str, Any]:
        opts = self.options.model_dump(mode="json") if isinstance(self.options, BaseModel) else self.options
        return {"name": self.entry.name, "provider": self.entry.provider, "options": opts}


# ------------------------------------------------------- register(...) signatures, one per table


def register_importance(name: str, cls: type, defaults: dict | None = None,
                        description: str | None = None) -> MethodEntry:
    """``prunekit_register_importances``: an :class:`~prunekit.importance.base.Importance` subclass under a
    method name."""
    from prunekit.importance.base import Importance

    _check_name(name)
    if not (isinstance(cls, type) and issubclass(cls, Importance)):
        raise PluginError(f"method {name!r}: {cls!r} is not a subclass of prunekit.importance.base.Importance")
    if defaults is not None and not isinstance(defaults, dict):
        raise PluginError(f"method {name!r}: defaults must be a dict, got {type(defaults).__name__}")
    check_options_model(cls.Options, defaults, f"method {name!r} options")
    return MethodEntry(name, cls, dict(defaults or {}), description or _first_doc_line(cls), "")


def register_grouper(name: str, fn: Callable, options: type[BaseModel] | None = None,
                     description: str | None = None) -> NamedEntry:
    """``prunekit_register_groupers``: ``fn(model, adapter, layers, options) -> list[PruningGroup]``."""
    return _callable_entry(name, fn, options, description, GROUPER_CALL, "grouper")


def register_evaluator(name: str, fn: Callable, options: type[BaseModel] | None = None,
                       description: str | None = None) -> NamedEntry:
    """``prunekit_register_evaluators``: ``fn(model, tokenizer, options) -> dict[str, float]``."""
    return _callable_entry(name, fn, options, description, EVALUATOR_CALL, "evaluator")


def _class_entry(name: str, cls: Any, what: str, call: str, description: str | None,
                 reserved: str | None = None) -> NamedEntry:
    """A registered class with a nested ``Options`` model whose instances the core calls as ``call``."""
    _check_name(name)
    if name == "none" and reserved:
        raise PluginError(f"{what} name 'none' is reserved (it means: {reserved})")
    method = call.split("(")[0]
    if not isinstance(cls, type) or not callable(getattr(cls, method, None)):
        raise PluginError(f"{what} {name!r}: {cls!r} is not a class with a {call} method")
    check_options_model(getattr(cls, "Options", None), None, f"{what} {name!r} Options")
    return NamedEntry(name, cls, "", options_model=cls.Options, description=description or _first_doc_line(cls))


def register_recovery(name: str, cls: type, description: str | None = None) -> NamedEntry:
    """``prunekit_register_recovery``: ``cls(options).recover(model, tokenizer, config) -> dict`` (with
    ``teacher=`` as well when ``cls.needs_teacher`` is true)."""
    return _class_entry(name, cls, "recovery", "recover(model, tokenizer, config)", description, "no recovery")


def register_repairer(name: str, cls: type, description: str | None = None) -> NamedEntry:
    """``prunekit_register_repairers``: ``cls(options).repair(ctx) -> dict`` (kept weights updated in place)."""
    return _class_entry(name, cls, "repair", "repair(ctx)", description, "no repair")


def register_allocator(name: str, cls: type, description: str | None = None) -> NamedEntry:
    """``prunekit_register_allocators``: ``cls(options).allocate(ctx) -> list[int]`` (units each group loses)."""
    return _class_entry(name, cls, "allocator", "allocate(ctx)", description)


def register_adapter(cls: type) -> NamedEntry:
    """``prunekit_register_adapters``: an :class:`~prunekit.adapters.base.Adapter` subclass; keyed by model type."""
    from prunekit.adapters.base import Adapter

    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise PluginError(f"{cls!r} is not a subclass of prunekit.adapters.base.Adapter")
    types = getattr(cls, "model_types", ())
    if not types or isinstance(types, str) or not all(isinstance(t, str) for t in types):
        raise PluginError(f"adapter {cls.__name__}: model_types must be a non-empty tuple of strings, got {types!r}")
    return NamedEntry(cls.__name__, cls, "", description=_first_doc_line(cls))


def _callable_entry(name: str, fn: Any, options: Any, description: str | None, params: tuple[str, ...],
                    what: str) -> NamedEntry:
    _check_name(name)
    _check_callable(fn, params, what)
    if options is not None:
        check_options_model(options, None, f"{what} {name!r} options")
    return NamedEntry(name, fn, "", options_model=options, description=description or _first_doc_line(fn))


@dataclass(frozen=True)
class Table:
    """One kind of component: the hook that fills it and the ``register`` function plugins call."""

    hook: str
    register: Callable[..., Any]
    keys: Callable[[Any], list[str]] = lambda entry: [entry.name]  # adapters: one key per model type


# One line per kind of component. The attribute ``registry.<table>`` is the name -> entry dict.
TABLES: dict[str, Table] = {
    "methods": Table("prunekit_register_importances", register_importance),
    "groupers": Table("prunekit_register_groupers", register_grouper),
    "recovery": Table("prunekit_register_recovery", register_recovery),
    "repairers": Table("prunekit_register_repairers", register_repairer),
    "evaluators": Table("prunekit_register_evaluators", register_evaluator),
    "allocators": Table("prunekit_register_allocators", register_allocator),
    "adapters": Table("prunekit_register_adapters", register_adapter, lambda e: list(e.impl.model_types)),
}
SINGULAR = {"methods": "method", "groupers": "grouper", "recovery": "recovery", "repairers": "repair",
            "evaluators": "evaluator",
            "allocators": "allocator", "adapters": "model type"}


def register_signature(table: str) -> str:
    """``register(name, fn, options=None, ...)``: the call a plugin makes in ``TABLES[table].hook`` (documented)."""
    params = inspect.signature(TABLES[table].register).parameters.values()
    return "register(" + ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                                   for p in params) + ")"


# --------------------------------------------------------------------------------------- registry


@dataclass
class Registry:
    """Everything registered through the hooks; contested names are kept aside with their providers."""

    tables: dict[str, dict[str, Any]] = field(default_factory=lambda: {t: {} for t in TABLES})
    contested: dict[str, dict[str, list[Any]]] = field(default_factory=lambda: {t: {} for t in TABLES})
    failed_plugins: dict[str, PluginFailure] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)  # plugin name -> "package (entry point 'x')"

    def __getattr__(self, name: str) -> dict[str, Any]:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    @property
    def methods(self) -> dict[str, MethodEntry]:
        return self.tables["methods"]

    @property
    def adapters(self) -> list[NamedEntry]:
        """Adapter entries, one per class (the table itself is keyed by model type)."""
        return list({id(e): e for e in self.tables["adapters"].values()}.values())

    @classmethod
    def from_host(cls, host: PluginHost) -> Registry:
        """Call every plugin's register hooks, plugin by plugin; a plugin that registers wrongly is disabled."""
        reg = cls()
        for plugin_name, plugin in host.plugins():
            staged = _stage(host, plugin_name, plugin)
            if staged is not None:
                reg.origins[plugin_name] = host.origin(plugin)
                for table, key, entry in staged:
                    reg._add(host, table, key, entry)
        reg.failed_plugins = dict(host.failed)
        return reg

    def _add(self, host: PluginHost, table: str, key: str, entry: Any) -> None:
        entries, contested = self.tables[table], self.contested[table]
        if key in contested:
            contested[key].append(entry)
        elif key in entries:
            contested[key] = [entries.pop(key), entry]
        else:
            entries[key] = entry
            return
        host.warn(f"prunekit: warning: {self._clash(table, key)}; every other name keeps working")

    def _clash(self, table: str, key: str) -> str:
        entries = sorted(self.contested[table][key], key=lambda e: (e.provider != "prunekit", e.plugin))
        who = " and ".join(self.origins.get(e.plugin, e.provider) for e in entries)
        fixes = " or ".join(f"PRUNEKIT_DISABLE_PLUGINS={e.plugin}" for e in entries)
        return f"{SINGULAR[table]} {key!r} is registered by both {who}; disable one of them ({fixes})"

    # -------------------------------------------------------------------------- lookups

    def method(self, name: str) -> MethodEntry:
        if name in self.contested["methods"]:
            raise UserError(self._clash("methods", name))
        if name not in self.methods:
            raise UserError(f"method: unknown method {name!r}; available: {', '.join(sorted(self.methods)) or 'none'}"
                            + self._failed_hint())
        return self.methods[name]

    def named(self, table: str, name: str) -> NamedEntry:
        if name in self.contested.get(table, {}):
            raise UserError(self._clash(table, name))
        entries: dict[str, NamedEntry] = self.tables[table]
        if name not in entries:
            raise UserError(f"{table}: unknown name {name!r}; available: {', '.join(sorted(entries)) or 'none'}"
                            + self._failed_hint())
        return entries[name]

    def resolve(self, table: str, name: str, options: dict | None, prefix: str) -> Resolved:
        """The entry registered as ``name`` with ``options`` validated by its model (UserError naming the field)."""
        entry = self.named(table, name)
        return Resolved(entry, entry.options(options, prefix))

    def adapter_for(self, model: Any):
        model_type = getattr(model.config, "model_type", None)
        if model_type in self.contested["adapters"]:
            raise UserError(f"model: {self._clash('adapters', model_type)}")
        entry = self.tables["adapters"].get(model_type)
        if entry is not None:
            return entry.impl(model)
        supported = sorted(self.tables["adapters"])
        raise UserError(f"model: unsupported architecture {model_type!r}; supported: {', '.join(supported)}")

    # -------------------------------------------------------------------------- listings

    def registered_by(self, plugin: str) -> dict[str, list[str]]:
        """What ``plugin`` registered, per table (contested names included)."""
        out: dict[str, list[str]] = {}
        for table in TABLES:
            keys = [k for k, e in self.tables[table].items() if e.plugin == plugin]
            keys += [k for k, es in self.contested[table].items() if any(e.plugin == plugin for e in es)]
            if keys:
                out[table] = sorted(set(keys))
        return out

    def contested_by(self, plugin: str) -> dict[str, list[str]]:
        """Names ``plugin`` registered that another plugin registered too."""
        return {t: sorted(k for k, es in self.contested[t].items() if any(e.plugin == plugin for e in es))
                for t in TABLES if any(e.plugin == plugin for es in self.contested[t].values() for e in es)}

    def _failed_hint(self) -> str:
        if not self.failed_plugins:
            return ""
        return " (plugins that failed to load: " + ", ".join(f"{n}: {e}" for n, e in self.failed_plugins.items()) + ")"


def _stage(host: PluginHost, plugin_name: str, plugin: object) -> list[tuple[str, str, Any]] | None:
    """Every registration of one plugin, checked; None (and the plugin disabled) when any is wrong."""
    staged: list[tuple[str, str, Any]] = []
    provider = host.provider_of(plugin)
    for table, spec in TABLES.items():
        seen: set[str] = set()

        def register(*args: Any, _table: str = table, _spec: Table = spec, _seen: set = seen, **kwargs: Any) -> None:
            try:
                inspect.signature(_spec.register).bind(*args, **kwargs)
            except TypeError as exc:
                raise PluginError(f"{_spec.hook}: bad call register{_call_repr(args, kwargs)}: {exc}; "
                                  f"expected {register_signature(_table)}") from None
            entry = replace(_spec.register(*args, **kwargs), provider=provider, plugin=plugin_name)
            for key in _spec.keys(entry):
                if key in _seen:
                    raise PluginError(f"{_spec.hook}: registers {key!r} twice")
                _seen.add(key)
                staged.append((_table, key, entry))

        try:
            host.call_register_hook(spec.hook, plugin, register)
        except PluginError as exc:
            host.disable(plugin_name, str(exc), tb=traceback.format_exc())
            return None
        except Exception as exc:  # the plugin's own hook code raised
            host.disable(plugin_name, f"{spec.hook} raised {type(exc).__name__}: {exc}", tb=traceback.format_exc())
            return None
    return staged


def _call_repr(args: tuple, kwargs: dict) -> str:
    parts = [repr(a) if not isinstance(a, type) else a.__name__ for a in args]
    parts += [f"{k}={v!r}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def get_registry(host: PluginHost | None = None) -> Registry:
    """The registry of ``host`` (default: the process-wide plugin host), built once per set of plugins: every
    caller shares it, and registering or unregistering a plugin on the host builds it afresh."""
    host = host or get_host()
    key = tuple((name, id(plugin)) for name, plugin in host.plugins())
    cached = getattr(host, "_registry", None)
    if cached is None or cached[0] != key:
        registry = Registry.from_host(host)  # may disable plugins that register wrongly: key again after
        cached = host._registry = (tuple((n, id(p)) for n, p in host.plugins()), registry)
    return cached[1]


def describe_plugins(host: PluginHost) -> list[dict]:
    """Installed plugins: package, version, hooks and what each registered (what ``prunekit plugins`` prints)."""
    registry = get_registry(host)  # may disable plugins whose registrations are broken
    rows = []
    for name, plugin in host.plugins():
        dist = host.dists.get(name)
        rows.append({
            "name": name,
            "package": dist.metadata["Name"] if dist else None,
            "version": dist.version if dist else None,
            "hooks": sorted(h.name for h in host.pm.get_hookcallers(plugin) or []),
            "registered": registry.registered_by(name),
            **({"contested": c} if (c := registry.contested_by(name)) else {}),
        })
    rows += [{"name": n, "package": f.package, "error": f.reason,
              "fix": f"PRUNEKIT_DISABLE_PLUGINS={n}"} for n, f in sorted(host.failed.items())]
    return rows

