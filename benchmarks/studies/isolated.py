"""Run one measurement in a fresh Python process and collect its JSON record, even after a crash or timeout.

Peak RSS never goes down inside a process and a CUDA out-of-memory can leave allocator state behind, so
the GPU check and the scaling table give every configuration its own process. The child writes its
record (atomically) after every stage; when it dies or runs out of time the parent still gets the stages
it finished, plus the error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import prunekit.runtime.atomic as atomic


def write_json(path: str | os.PathLike, record: Any) -> None:
    """Write ``record`` as JSON to ``path`` atomically (a reader never sees half a file)."""
    atomic.write_json(path, record)


def run_child(module: str, spec: dict[str, Any], timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m module --child SPEC --record PATH`` with a wall-clock limit; the child's last record.

    On a non-zero exit or a timeout the record gets ``error`` (with the tail of the child's stderr) and
    ``returncode``; ``child_seconds`` is the wall time including the child's imports.
    """
    with tempfile.TemporaryDirectory(prefix="prunekit-child-") as tmp:
        path = Path(tmp) / "record.json"
        cmd = [sys.executable, "-m", module, "--child", json.dumps(spec), "--record", str(path)]
        start = time.perf_counter()
        error = None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout_s),
                                  env={**os.environ, **(env or {})})
            code = proc.returncode
            if code != 0:
                error = f"exit code {code}: " + "\n".join(proc.stderr.strip().splitlines()[-15:])
        except subprocess.TimeoutExpired as exc:
            code = None
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            error = f"timed out after {timeout_s:.0f} s: " + "\n".join(stderr.strip().splitlines()[-5:])
        seconds = time.perf_counter() - start
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {"spec": spec}
    record["child_seconds"] = round(seconds, 3)
    if error is not None and "error" not in record:
        record["error"] = error
    if code != 0:
        record["returncode"] = code
    return record
