"""The plugin manager: entry-point group ``prunekit``; built-ins load exactly like third-party plugins.

Environment lists (comma-separated plugin/entry-point names):
``PRUNEKIT_LOAD_PLUGINS`` loads only the named plugins; ``PRUNEKIT_DISABLE_PLUGINS`` skips them.
A plugin that fails to import is recorded with its error (see :func:`failed_plugins`); the rest work.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from prunekit import hookspecs
from prunekit.errors import UserError

ENTRY_POINT_GROUP = "prunekit"


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


@dataclass
class PluginHost:
    """A typed façade over the pluggy manager, so call sites read like ordinary method calls."""

    pm: pluggy.PluginManager
    failed: dict[str, str] = field(default_factory=dict)
    dists: dict[str, importlib.metadata.Distribution] = field(default_factory=dict)

    def collect(self, hook_name: str) -> list[tuple[str, tuple, dict]]:
        """Call one ``register_*`` hook on every plugin; returns (provider, args, kwargs) per registration."""
        collected: list[tuple[str, tuple, dict]] = []
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            provider = self.provider_of(impl.plugin)

            def register(*args: Any, _provider: str = provider, **kwargs: Any) -> None:
                collected.append((_provider, args, kwargs))

            impl.function(register=register)
        return collected

    def provider_of(self, plugin: object) -> str:
        """The distribution (or, for a plugin registered by hand, plugin) name that provides ``plugin``."""
        name = self.pm.get_name(plugin) or repr(plugin)
        dist = self.dists.get(name)
        return dist.metadata["Name"] if dist is not None else name

    def describe(self) -> list[dict]:
        """Installed plugins with package, version and hooks (what ``prunekit plugins`` prints)."""
        rows = []
        for plugin in self.pm.get_plugins():
            name = self.pm.get_name(plugin)
            dist = self.dists.get(name)
            rows.append(
                {
                    "name": name,
                    "package": dist.metadata["Name"] if dist else None,
                    "version": dist.version if dist else None,
                    "hooks": sorted(h.name for h in self.pm.get_hookcallers(plugin) or []),
                }
            )
        rows.sort(key=lambda r: r["name"] or "")
        rows += [{"name": n, "error": e} for n, e in sorted(self.failed.items())]
        return rows


def build_host() -> PluginHost:
    """A fresh plugin host with every allowed entry-point plugin loaded."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm)
    allow, deny = _env_list("PRUNEKIT_LOAD_PLUGINS"), _env_list("PRUNEKIT_DISABLE_PLUGINS") or set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in deny or (allow is not None and ep.name not in allow) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            host.failed[ep.name] = f"{type(exc).__name__}: {exc}"
            continue
        if ep.dist is not None:
            host.dists[ep.name] = ep.dist
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise UserError(f"plugin error: {exc}") from exc
    return host


@lru_cache(maxsize=1)
def get_host() -> PluginHost:
    """The process-wide plugin host (built on first use)."""
    return build_host()


def reset() -> None:
    """Forget the cached host (tests and long-lived processes that install plugins)."""
    get_host.cache_clear()
