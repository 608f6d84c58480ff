"""Killed runs: SIGINT, SIGTERM and SIGKILL at named points of saving (``PRUNEKIT_TEST_PAUSE``), in a
subprocess on a tiny model. The input stays byte-identical; the output is absent, the previous one, or
the new one complete and loadable, never empty or half-written; the next run removes what a SIGKILL left."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunekit.cli import main
from prunekit.io.export import load_pruned

pytestmark = [pytest.mark.subprocess]

RUN = ["run", "--no-eval", "--ratio", "0.34", "--method", "magnitude"]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    """Scratch folders and lock files beside ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _default_sigint() -> None:
    """SIGINT as a terminal would deliver it: a suite started in the background (``cmd &``) inherits it ignored,
    and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def paused_run(model: Path, out: Path, point: str, *extra: str) -> subprocess.Popen:
    """Start ``prunekit run`` in a subprocess and return once it waits at ``point``."""
    flag = out.parent / f"paused-{point.replace(':', '-')}"
    flag.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PRUNEKIT_TEST_PAUSE": f"{point}={flag}"}
    proc = subprocess.Popen([sys.executable, "-m", "prunekit.cli", *RUN, "--model", str(model), "--output", str(out),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 180
    while not flag.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run never reached {point} (exit {proc.returncode}): {proc.communicate()[1]}")
        time.sleep(0.05)
    flag.unlink()
    return proc


def kill(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def assert_complete(out: Path) -> None:
    """A finished output: run.json listing every file, and a model that loads and runs."""
    manifest = json.loads((out / "run.json").read_text())
    assert sorted(manifest["files"] + ["run.json"]) == sorted(p.name for p in out.iterdir())
    model = load_pruned(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8).view(1, 8)).logits).all()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_mid_save_leaves_nothing(tiny_model_dir, tmp_path, sig, code):
    before, out = digest(tiny_model_dir), tmp_path / "out"
    rc, err = kill(paused_run(tiny_model_dir, out, "save:mid"), sig)
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and ("interrupted" in err or "SIGTERM" in err), err
    assert not out.exists() and leftovers(out) == []
    assert digest(tiny_model_dir) == before


def test_sigkill_mid_save_then_next_run_cleans_up(tiny_model_dir, tmp_path, capsys):
    before, out = digest(tiny_model_dir), tmp_path / "out"
    proc = paused_run(tiny_model_dir, out, "save:mid")
    # a second run for the same output while the first holds it fails cleanly
    assert main([*RUN, "--model", str(tiny_model_dir), "--output", str(out)]) == 2
    assert f"another prunekit run (pid {proc.pid})" in capsys.readouterr().err
    rc, _ = kill(proc, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not out.exists()  # the half-written folder never got the output's name
    assert any(".partial-" in name for name in leftovers(out))
    assert digest(tiny_model_dir) == before
    assert main([*RUN, "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    assert "removed 1 folder(s) left by an interrupted run" in capsys.readouterr().err
    assert leftovers(out) == [] and digest(tiny_model_dir) == before
    assert_complete(out)


@pytest.fixture
def previous_output(tiny_model_dir, tmp_path) -> Path:
    """A finished prunekit output that the next run --overwrites."""
    out = tmp_path / "out"
    assert main([*RUN, "--model", str(tiny_model_dir), "--output", str(out), "--seed", "1"]) == 0
    return out


@pytest.mark.parametrize("point,sig", [("save:scratch", signal.SIGKILL), ("save:publish", signal.SIGTERM),
                                       ("save:publish", signal.SIGKILL)])
def test_overwrite_killed_before_swap_keeps_previous_output(tiny_model_dir, previous_output, point, sig, capsys):
    out, before, old = previous_output, digest(tiny_model_dir), digest(previous_output)
    rc, err = kill(paused_run(tiny_model_dir, out, point, "--overwrite", "--seed", "2"), sig)
    assert rc == (143 if sig == signal.SIGTERM else -signal.SIGKILL), err
    assert digest(out) == old  # the previous output, untouched and whole
    assert digest(tiny_model_dir) == before
    assert main([*RUN, "--model", str(tiny_model_dir), "--output", str(out), "--overwrite", "--seed", "3"]) == 0
    assert leftovers(out) == [] and json.loads((out / "run.json").read_text())["seed"] == 3
    assert_complete(out)


def test_overwrite_killed_after_swap_has_new_output(tiny_model_dir, previous_output, capsys):
    out, before = previous_output, digest(tiny_model_dir)
    rc, _ = kill(paused_run(tiny_model_dir, out, "save:published", "--overwrite", "--seed", "2"), signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert json.loads((out / "run.json").read_text())["seed"] == 2  # the swap is one step: new and complete
    assert_complete(out)
    assert any(".partial-" in name for name in leftovers(out))  # the old version, not yet deleted
    assert main([*RUN, "--model", str(tiny_model_dir), "--output", str(out), "--overwrite", "--seed", "3"]) == 0
    assert "left by an interrupted run" in capsys.readouterr().err
    assert leftovers(out) == [] and digest(tiny_model_dir) == before
