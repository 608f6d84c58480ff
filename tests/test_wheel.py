"""The installed wheel claims no generic top-level name: a working directory with its own ``plugins/``
and ``benchmarks/`` packages neither shadows nor breaks prunekit's built-in methods."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from prunekit.plugin.host import build_host
from prunekit.plugin.registry import Registry

pytestmark = [pytest.mark.subprocess]

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".cache", "runs", "out")

# Runs in a directory holding its own plugins/ and benchmarks/ packages, which raise when imported.
PROBE = r'''
import importlib, importlib.metadata, importlib.util, json, pkgutil, sys
import prunekit
from prunekit.plugin.host import get_host
from prunekit.plugin.registry import get_registry

registry = get_registry()
import prunekit.benchmarks
skipped = {}
for info in pkgutil.iter_modules(prunekit.benchmarks.__path__):
    if info.name.startswith("_"):  # __main__ runs the harness
        continue
    try:
        importlib.import_module(f"prunekit.benchmarks.{info.name}")
    except ModuleNotFoundError as exc:  # an optional dependency (bench extra) that is not installed
        if exc.name in ("plugins", "benchmarks"):
            raise
        skipped[info.name] = exc.name
print(json.dumps({
    "prunekit": prunekit.__file__,
    "distribution": str(importlib.metadata.distribution("prunekit").locate_file("")),
    "plugin_files": sorted(getattr(p, "__file__", "") for p in get_host().pm.get_plugins()
                           if getattr(p, "__name__", "").startswith("prunekit.")),  # not third-party examples
    "benchmark_files": sorted(m.__file__ for n, m in sys.modules.items() if n.startswith("prunekit.benchmarks")),
    "methods": sorted(registry.methods),
    "failed": registry.failed_plugins,
    "shadowing": [importlib.util.find_spec(n).origin for n in ("plugins", "benchmarks")],
    "generic_loaded": sorted(n for n in sys.modules if n.split(".")[0] in ("plugins", "benchmarks")),
    "skipped": skipped,
}))
'''


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """prunekit's wheel, built offline from a copy of the repository and installed into a bare folder."""
    pytest.importorskip("setuptools", reason="building the wheel offline (no build isolation) needs setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, tmp / "src", ignore=NOT_SOURCE)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
                    str(tmp / "src")], check=True, env=env, capture_output=True)
    (wheel,) = (tmp / "dist").glob("prunekit-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(tmp / "site"), str(wheel)], check=True,
                   env=env, capture_output=True)
    return tmp


def test_wheel_installs_nothing_but_prunekit(wheel_site):
    (wheel,) = (wheel_site / "dist").glob("prunekit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    name, version = wheel.name.split("-")[:2]
    assert {n.split("/")[0] for n in names} == {"prunekit", f"{name}-{version}.dist-info"}
    for packaged in ("prunekit/builtin/moreau/__init__.py", "prunekit/builtin/lora/trainer.py",
                     "prunekit/builtin/distill/loss.py",
                     "prunekit/benchmarks/harness.py", "prunekit/io/templates/modeling_prunekit.py",
                     "prunekit/io/templates/configuration_prunekit.py", "prunekit/data/corpora/wikitext-2-v1/test.txt",
                     "prunekit/core/config.py", "prunekit/cli/__main__.py"):
        assert packaged in names
    assert not [n for n in names if "/studies/" in n or "/results/" in n]  # studies and raw results stay out


def test_wheel_sees_every_builtin_method_beside_a_local_plugins_package(wheel_site, tmp_path):
    work = tmp_path / "project"
    for name in ("plugins", "benchmarks"):
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text(f"raise ImportError('{name} of the working directory imported')\n")
        (work / name / "magnitude.py").write_text("raise ImportError('not prunekit')\n")
    site = wheel_site / "site"
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # the wheel, not the editable tree (whose dist-info and entry points also sit in the venv's site-packages)
    assert Path(seen["prunekit"]).is_relative_to(site) and Path(seen["distribution"]).resolve() == site.resolve()
    assert seen["plugin_files"] and all(Path(f).is_relative_to(site) for f in seen["plugin_files"])
    assert seen["benchmark_files"] and all(Path(f).is_relative_to(site) for f in seen["benchmark_files"])
    # the local packages are first on the path, and nothing imported them
    assert seen["shadowing"] == [str(work / "plugins" / "__init__.py"), str(work / "benchmarks" / "__init__.py")]
    assert seen["generic_loaded"] == [] and seen["failed"] == {}
    expected = sorted(Registry.from_host(build_host()).methods)
    assert {"magnitude", "random", "taylor", "moreau", "moreau-gs"} <= set(expected)
    assert seen["methods"] == expected
