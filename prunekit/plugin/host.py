"""The plugin manager: entry-point group ``prunekit``; built-ins load exactly like third-party plugins.

A broken plugin never takes the others down. A plugin that fails to import, fails pluggy's checks or
implements a hook that does not exist is *disabled*: unregistered, listed by ``prunekit plugins`` with
its error, and reported once as a one-line warning naming the package, the entry point and the fix.
Entry-point names never shadow each other: when two packages declare the same name, the core's keeps
it and the other loads as ``package:name`` (with a warning), so both stay visible.

Environment lists (comma-separated entry-point names, or ``package:name``):
``PRUNEKIT_LOAD_PLUGINS`` loads only the named plugins (plus the core's own adapters and groupers,
which only ``PRUNEKIT_DISABLE_PLUGINS`` removes); ``PRUNEKIT_DISABLE_PLUGINS`` skips them.
``PRUNEKIT_DEBUG=1`` adds the full traceback to a failed plugin's warning.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import pluggy

import prunekit.plugin.hookspecs as hookspecs

ENTRY_POINT_GROUP = "prunekit"
CORE_DISTRIBUTION = "prunekit"
logger = logging.getLogger("prunekit.plugin.host")


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def debug_enabled() -> bool:
    """``PRUNEKIT_DEBUG`` set to anything but empty/0: show full tracebacks of failed plugins."""
    return os.environ.get("PRUNEKIT_DEBUG", "") not in ("", "0")


def _dist_name(ep: importlib.metadata.EntryPoint) -> str | None:
    return ep.dist.metadata["Name"] if ep.dist is not None else None


def is_core_entry_point(ep: importlib.metadata.EntryPoint) -> bool:
    """The core's own infrastructure (adapters, groupers, ...): prunekit entry points outside prunekit.builtin.

    ``PRUNEKIT_LOAD_PLUGINS`` keeps these, because without them no model can be pruned at all.
    """
    module = ep.value.split(":")[0]
    return _dist_name(ep) == CORE_DISTRIBUTION and not module.startswith("prunekit.builtin.")


@dataclass(frozen=True)
class PluginFailure:
    """Why one plugin was disabled, in one line, with the optional full traceback."""

    plugin: str
    package: str | None
    reason: str
    traceback: str | None = None

    def message(self) -> str:
        pkg = f" from package {self.package}" if self.package else ""
        return (f"prunekit: warning: plugin {self.plugin!r}{pkg} disabled: {self.reason} "
                f"(to silence: PRUNEKIT_DISABLE_PLUGINS={self.plugin})")

    def __str__(self) -> str:
        return self.reason


@dataclass
class PluginHost:
    """A typed façade over the pluggy manager, so call sites read like ordinary method calls."""

    pm: pluggy.PluginManager
    failed: dict[str, PluginFailure] = field(default_factory=dict)
    dists: dict[str, importlib.metadata.Distribution] = field(default_factory=dict)
    entry_points: dict[str, str] = field(default_factory=dict)  # plugin name -> entry-point name
    _warned: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ warnings and failures

    def warn(self, message: str, detail: str | None = None) -> None:
        """Log a one-line warning once per host (a registry is built several times per process)."""
        if message in self._warned:
            return
        self._warned.add(message)
        logger.warning(message + (f"\n{detail}" if detail and debug_enabled() else ""))

    def disable(self, name: str, reason: str, package: str | None = None, tb: str | None = None) -> PluginFailure:
        """Unregister plugin ``name`` (if registered), record why, and warn once."""
        plugin = self.pm.get_plugin(name)
        package = package or (self.package_of(plugin) if plugin is not None else None)
        if plugin is not None:
            self.pm.unregister(plugin=plugin, name=name)
        failure = PluginFailure(name, package, " ".join(reason.split()), tb)
        self.failed[name] = failure
        self.warn(failure.message(), tb)
        return failure

    def register(self, plugin: object, name: str, package: str | None = None) -> bool:
        """Register ``plugin`` under ``name``; disable it (and return False) when pluggy or the hook check
        refuses it."""
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy.PluginValidationError: an implementation with arguments no spec has
            self.disable(name, f"{type(exc).__name__}: {exc}", package, traceback.format_exc())
            return False
        unknown = self.unknown_hooks(plugin)
        if unknown:
            self.disable(name, "; ".join(unknown), package)
            return False
        return True

    def unknown_hooks(self, plugin: object) -> list[str]:
        """One line per hook implementation of ``plugin`` that matches no hookspec, with the likely intended name."""
        specs = [n for n in dir(hookspecs) if n.startswith("prunekit_")]
        problems = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            impls = [i for i in caller.get_hookimpls() if i.plugin is plugin and not i.optionalhook]
            if caller.has_spec() or not impls:
                continue
            close = difflib.get_close_matches(caller.name, specs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (hooks: {', '.join(specs)})"
            problems.append(f"implements unknown hook {caller.name!r}{hint}")
        return problems

    # ------------------------------------------------------------------ what plugins provide

    def plugins(self) -> list[tuple[str, object]]:
        """(name, plugin) of every registered plugin, sorted by name (a stable order for the registry)."""
        return sorted(((self.pm.get_name(p) or repr(p), p) for p in self.pm.get_plugins()), key=lambda t: t[0])

    def call_register_hook(self, hook_name: str, plugin: object, register: Callable[..., Any]) -> None:
        """Call one ``register_*`` hook of one plugin with ``register`` as its callback."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                impl.function(register=register)

    def collect(self, hook_name: str) -> list[tuple[str, tuple, dict]]:
        """Call one ``register_*`` hook on every plugin; returns (provider, args, kwargs) per registration."""
        collected: list[tuple[str, tuple, dict]] = []
        for _, plugin in self.plugins():
            provider = self.provider_of(plugin)
            self.call_register_hook(hook_name, plugin,
                                    lambda *a, _p=provider, **k: collected.append((_p, a, k)))
        return collected

    def package_of(self, plugin: object) -> str | None:
        """The distribution that installed ``plugin``, or None for a plugin registered by hand."""
        dist = self.dists.get(self.pm.get_name(plugin) or "")
        return dist.metadata["Name"] if dist is not None else None

    def provider_of(self, plugin: object) -> str:
        """The distribution (or, for a plugin registered by hand, plugin) name that provides ``plugin``."""
        return self.package_of(plugin) or self.pm.get_name(plugin) or repr(plugin)

    def origin(self, plugin: object) -> str:
        """``package (entry point 'name')`` or ``plugin 'name'``: who to blame, in words."""
        name = self.pm.get_name(plugin) or repr(plugin)
        package = self.package_of(plugin)
        return f"{package} (entry point {self.entry_points.get(name, name)!r})" if package else f"plugin {name!r}"


def _plugin_names(eps: list[importlib.metadata.EntryPoint]) -> list[tuple[str, importlib.metadata.EntryPoint]]:
    """A unique plugin name per entry point: the core keeps a contested name, other packages get ``package:name``."""
    by_name: dict[str, list[importlib.metadata.EntryPoint]] = defaultdict(list)
    for ep in eps:
        by_name[ep.name].append(ep)
    named = []
    for name, group in by_name.items():
        if len(group) == 1:
            named.append((name, group[0]))
            continue
        group.sort(key=lambda ep: (_dist_name(ep) != CORE_DISTRIBUTION, _dist_name(ep) or ""))
        keeper = group[0] if _dist_name(group[0]) == CORE_DISTRIBUTION else None
        for ep in group:
            named.append((name if ep is keeper else f"{_dist_name(ep)}:{name}", ep))
    return named


def build_host() -> PluginHost:
    """A fresh plugin host with every allowed entry-point plugin loaded; broken ones disabled with a warning."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm)
    allow, deny = _env_list("PRUNEKIT_LOAD_PLUGINS"), _env_list("PRUNEKIT_DISABLE_PLUGINS") or set()
    named = _plugin_names(list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)))
    for name, ep in named:
        if name != ep.name:
            others = sorted({_dist_name(e) or "?" for n, e in named if e.name == ep.name and e is not ep})
            host.warn(f"prunekit: warning: entry point {ep.name!r} is declared by {_dist_name(ep)} and by "
                      f"{', '.join(others)}; {_dist_name(ep)}'s loads as {name!r} "
                      f"(to skip it: PRUNEKIT_DISABLE_PLUGINS={name})")
        keys = {name, ep.name}
        if keys & deny or (allow is not None and not keys & allow and not is_core_entry_point(ep)):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            host.disable(name, f"cannot import {ep.value!r}: {type(exc).__name__}: {exc}", _dist_name(ep),
                         traceback.format_exc())
            continue
        if ep.dist is not None:
            host.dists[name] = ep.dist
        host.entry_points[name] = ep.name
        host.register(plugin, name, _dist_name(ep))
    return host


@lru_cache(maxsize=1)
def get_host() -> PluginHost:
    """The process-wide plugin host (built on first use)."""
    return build_host()


def reset() -> None:
    """Forget the cached host (tests and long-lived processes that install plugins)."""
    get_host.cache_clear()
