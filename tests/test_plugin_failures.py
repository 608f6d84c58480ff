"""Broken third-party plugins are contained: each case is disabled (or its name contested) with a one-line
warning naming the package, the entry point and the fix, and every other method keeps working.

The plugins are real installed distributions (a ``*.dist-info`` folder with ``entry_points.txt`` and a
module on ``sys.path``), discovered by ``importlib.metadata`` exactly as pip-installed ones are.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

import prunekit.plugin.host as plugin_host
from prunekit.cli import main
from prunekit.errors import UserError
from prunekit.plugin.registry import get_registry

_ids = itertools.count()

HEADER = """
import torch
from prunekit import hookimpl
from prunekit.importance.base import Importance, Options

class Keep(Importance):
    '''Throw-away method: scores every unit by its index.'''
    def scores(self, ctx):
        return [torch.arange(g.n_units, dtype=torch.float32) for g in ctx.groups]
"""


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(package, entry_point, body)``: an installed distribution whose prunekit entry point is ``body``."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PRUNEKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("PRUNEKIT_DISABLE_PLUGINS", raising=False)

    def _install(package: str, entry_point: str, body: str | None) -> str:
        module = f"pk_test_plugin_{next(_ids)}_{os.getpid()}"
        if body is not None:
            (tmp_path / f"{module}.py").write_text(HEADER + textwrap.dedent(body))
        info = tmp_path / f"{package.replace('-', '_')}-0.1.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        with (info / "entry_points.txt").open("a") as fh:
            fh.write(f"[prunekit]\n{entry_point} = {module}\n")
        plugin_host.reset()
        return module

    yield _install
    plugin_host.reset()


# (case, entry point, plugin body, text the warning must contain); every case also registers nothing usable
BROKEN = [
    ("import-error", "imp", "raise ImportError('needs libfoo')", "cannot import"),
    ("missing-module", "gone", None, "ModuleNotFoundError"),
    ("misspelt-hook", "typo", """
        @hookimpl
        def prunekit_register_importance(register):
            register("typo-method", Keep)
        """, "did you mean 'prunekit_register_importances'"),
    ("hook-with-unknown-argument", "argbad", """
        @hookimpl
        def prunekit_register_importances(register, extra):
            register("argbad-method", Keep)
        """, "extra"),
    ("register-without-name", "noname", """
        @hookimpl
        def prunekit_register_importances(register):
            register(Keep)
        """, "expected register(name, cls, defaults=None, description=None)"),
    ("register-not-an-importance", "notimp", """
        @hookimpl
        def prunekit_register_importances(register):
            register("notimp-method", dict)
        """, "not a subclass of prunekit.importance.base.Importance"),
    ("name-breaks-rule", "badname", """
        @hookimpl
        def prunekit_register_importances(register):
            register("My Method", Keep)
        """, "naming rule"),
    ("preset-default-invalid", "preset", """
        from prunekit.builtin.taylor import Taylor

        @hookimpl
        def prunekit_register_importances(register):
            register("preset-ok", Keep)
            register("taylor-bad", Taylor, defaults={"variant": "fourth"})
        """, "TaylorOptions.variant"),
    ("options-default-wrong-type", "optdef", """
        class PowerOptions(Options):
            power: float = "strong"

        class Power(Keep):
            Options = PowerOptions

        @hookimpl
        def prunekit_register_importances(register):
            register("power", Power)
        """, "PowerOptions.power"),
    ("hook-raises", "raiser", """
        @hookimpl
        def prunekit_register_importances(register):
            raise RuntimeError("forgot to configure")
        """, "raised RuntimeError: forgot to configure"),
    ("grouper-wrong-signature", "grp", """
        @hookimpl
        def prunekit_register_groupers(register):
            register("two-args", lambda model, adapter: [])
        """, "cannot be called as grouper(model, adapter, layers, options)"),
    ("grouper-options-not-a-model", "grpopt", """
        @hookimpl
        def prunekit_register_groupers(register):
            register("grp-ok", lambda model, adapter, layers, options: [], options={"a": 1})
        """, "must be a pydantic BaseModel subclass"),
    ("recovery-reserved-name", "rec", """
        @hookimpl
        def prunekit_register_recovery(register):
            register("none", Keep)
        """, "reserved"),
]


def _one_warning(caplog, entry_point: str) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == "prunekit.plugin.host"]
    mine = [m for m in lines if f"plugin {entry_point!r}" in m]
    assert len(mine) == 1, lines
    assert "\n" not in mine[0]
    return mine[0]


@pytest.mark.parametrize("case,entry_point,body,expected", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_plugin_is_disabled_with_a_named_warning(install, caplog, capsys, tiny_model_dir, tmp_path,
                                                        case, entry_point, body, expected):
    install(f"broken-{case}", entry_point, body)
    caplog.set_level(logging.WARNING, logger="prunekit.plugin.host")
    registry = get_registry()
    message = _one_warning(caplog, entry_point)
    assert f"from package broken-{case} disabled" in message and expected in message, message
    assert f"PRUNEKIT_DISABLE_PLUGINS={entry_point}" in message
    # disabled as a whole: nothing it registered is usable, and it is listed with its error
    assert plugin_host.get_host().pm.get_plugin(entry_point) is None
    assert not any(e.plugin == entry_point for table in registry.tables.values() for e in table.values())
    assert main(["plugins"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert expected in listed[entry_point]["error"] and listed[entry_point]["package"] == f"broken-{case}"
    # every other method still runs end to end
    assert main(["methods"]) == 0 and "magnitude" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["run", "--no-eval", "--method", "magnitude", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["method"]["provider"] == "prunekit"


def test_method_name_clash_is_contested_and_names_both(install, caplog, tiny_model_dir, tmp_path, capsys):
    install("clash-pkg", "clasher", """
        @hookimpl
        def prunekit_register_importances(register):
            register("taylor", Keep)
            register("keep-index", Keep)
        """)
    caplog.set_level(logging.WARNING, logger="prunekit.plugin.host")
    registry = get_registry()
    warning = [r.getMessage() for r in caplog.records if "registered by both" in r.getMessage()]
    assert len(warning) == 1 and "prunekit (entry point 'taylor')" in warning[0]
    assert "clash-pkg (entry point 'clasher')" in warning[0] and "PRUNEKIT_DISABLE_PLUGINS=clasher" in warning[0]
    with pytest.raises(UserError, match="registered by both prunekit .* and clash-pkg"):
        registry.method("taylor")
    run = ["run", "--no-eval", "--ratio", "0.34", "--model", str(tiny_model_dir)]
    assert main([*run, "--method", "taylor", "--output", str(tmp_path / "t")]) == 2
    assert "registered by both" in capsys.readouterr().err and not (tmp_path / "t").exists()
    for method in ("magnitude", "keep-index"):  # the rest of both plugins works
        assert main([*run, "--method", method, "--output", str(tmp_path / method)]) == 0
    capsys.readouterr()
    assert main(["plugins"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["clasher"]["contested"] == {"methods": ["taylor"]}
    assert listed["clasher"]["registered"]["methods"] == ["keep-index", "taylor"]


def test_disabling_one_side_of_a_clash_resolves_it(install, monkeypatch):
    install("clash-pkg", "clasher", """
        @hookimpl
        def prunekit_register_importances(register):
            register("taylor", Keep)
        """)
    monkeypatch.setenv("PRUNEKIT_DISABLE_PLUGINS", "clasher")
    plugin_host.reset()
    assert get_registry().method("taylor").provider == "prunekit"


def test_entry_point_name_never_shadows_a_builtin(install, caplog):
    install("evil-pkg", "magnitude", """
        @hookimpl
        def prunekit_register_importances(register):
            register("evil-magnitude", Keep)
        """)
    caplog.set_level(logging.WARNING, logger="prunekit.plugin.host")
    registry = get_registry()
    assert registry.method("magnitude").provider == "prunekit"
    assert registry.method("evil-magnitude").plugin == "evil-pkg:magnitude"
    [warning] = [r.getMessage() for r in caplog.records if "declared by" in r.getMessage()]
    assert "evil-pkg's loads as 'evil-pkg:magnitude'" in warning
    assert "PRUNEKIT_DISABLE_PLUGINS=evil-pkg:magnitude" in warning


def test_load_list_keeps_the_core_adapters_and_grouper(install, monkeypatch, tiny_model_dir, tmp_path):
    install("mine-pkg", "mine", """
        @hookimpl
        def prunekit_register_importances(register):
            register("keep-index", Keep)
        """)
    monkeypatch.setenv("PRUNEKIT_LOAD_PLUGINS", "mine")
    plugin_host.reset()
    registry = get_registry()
    assert set(registry.methods) == {"keep-index"}
    assert "blocks" in registry.groupers and "llama" in registry.tables["adapters"]
    assert main(["run", "--no-eval", "--method", "keep-index", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "o")]) == 0
    monkeypatch.setenv("PRUNEKIT_DISABLE_PLUGINS", "blocks")  # only the deny list removes them
    plugin_host.reset()
    assert "blocks" not in get_registry().groupers


def _cli(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(tmp_path), **env})


@pytest.mark.subprocess
def test_cli_warning_is_one_line_and_debug_shows_the_traceback(install, tmp_path):
    module = install("broken-pkg", "imp", "raise ImportError('needs libfoo')")
    result = _cli(tmp_path, "methods")
    assert result.returncode == 0 and "magnitude" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"prunekit: warning: plugin 'imp' from package broken-pkg disabled: cannot import '{module}': "
        "ImportError: needs libfoo (to silence: PRUNEKIT_DISABLE_PLUGINS=imp)"]
    for debug in (_cli(tmp_path, "methods", PRUNEKIT_DEBUG="1"), _cli(tmp_path, "--verbose", "methods")):
        assert "Traceback (most recent call last)" in debug.stderr and "needs libfoo" in debug.stderr
    quiet = _cli(tmp_path, "methods", PRUNEKIT_DISABLE_PLUGINS="imp")
    assert quiet.returncode == 0 and quiet.stderr == ""
