"""The plugin host: entry points, broken plugins, allow/deny lists, misspelled hooks."""

from __future__ import annotations

import sys

import pluggy
import pytest

from prunekit import hookimpl
from prunekit.errors import UserError
from prunekit.plugins import build_host
from prunekit.registry import Registry


@pytest.fixture
def broken_distribution(tmp_path, monkeypatch):
    """An installed distribution whose prunekit entry point fails to import."""
    info = tmp_path / "broken_prunekit_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-prunekit-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[prunekit]\nbroken = broken_prunekit_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "broken"


def test_builtins_load_through_entry_points():
    host = build_host()
    registry = Registry.from_host(host)
    assert {"magnitude", "random", "taylor"} <= set(registry.methods)
    assert registry.methods["taylor"].provider == "prunekit"
    assert "blocks" in registry.groupers
    assert {"uniform", "global", "measured"} <= set(registry.allocators)
    assert registry.allocators["measured"].provider == "prunekit"


def test_broken_plugin_is_reported_and_others_work(broken_distribution):
    host = build_host()
    assert "ModuleNotFoundError" in host.failed[broken_distribution]
    assert {"name": "broken", "error": host.failed["broken"]} in host.describe()
    registry = Registry.from_host(host)
    assert "taylor" in registry.methods
    with pytest.raises(UserError, match="broken"):
        registry.method("does-not-exist")


def test_disable_and_load_lists(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DISABLE_PLUGINS", "taylor, random")
    assert set(Registry.from_host(build_host()).methods).isdisjoint({"taylor", "random"})
    monkeypatch.delenv("PRUNEKIT_DISABLE_PLUGINS")
    monkeypatch.setenv("PRUNEKIT_LOAD_PLUGINS", "magnitude")
    host = build_host()
    assert [p["name"] for p in host.describe()] == ["magnitude"]


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def prunekit_register_importance(self, register):  # missing "s"
            pass

    host = build_host()
    host.pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError):
        host.pm.check_pending()


def test_preset_with_invalid_defaults_is_the_plugins_bug():
    from prunekit.builtin.taylor import Taylor

    class BadPreset:
        @hookimpl
        def prunekit_register_importances(self, register):
            register("taylor-bad", Taylor, defaults={"variant": "fourth"})

    host = build_host()
    host.pm.register(BadPreset())
    with pytest.raises(UserError, match="variant"):
        Registry.from_host(host)
