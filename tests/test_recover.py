"""``prunekit recover``: recovery of an already pruned checkpoint, one process and under accelerate launch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from prunekit.cli import main
from prunekit.io.export import load_pruned

TINY = {"max_examples": 8, "cutoff_len": 32, "batch_size": 4, "epochs": 2, "lr": 1e-2, "seed": 0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def pruned_dir(tiny_model_dir, tmp_path):
    """A tiny checkpoint pruned by `prunekit run` (magnitude, layers 1-2: per-layer shapes)."""
    config = tmp_path / "prune.yaml"
    config.write_text("selection:\n  layers: [1, 3]\n")
    out = tmp_path / "pruned"
    assert main(["run", "--no-eval", "--method", "magnitude", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(out), "--config", str(config)]) == 0
    return out


def _options() -> list[str]:
    return [arg for k, v in TINY.items() for arg in ("-o", f"{k}={json.dumps(v)}")]


def test_recover_a_pruned_checkpoint(pruned_dir, tmp_path, capsys):
    before = _digest(pruned_dir)
    plain = load_pruned(pruned_dir).state_dict()
    out = tmp_path / "recovered"

    assert main(["recover", str(pruned_dir), "--output", str(out), *_options()]) == 0

    assert _digest(pruned_dir) == before  # the input checkpoint is untouched
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["command"] == "recover" and manifest["recovery"]["method"] == "lora"
    assert manifest["pruned_from"]["config"]["method"] == "magnitude"  # provenance of the pruning kept
    info = manifest["recovery"]["info"]
    assert info["steps"] == 4 and info["loss_last_epoch"] < info["loss_first_epoch"] and info["processes"] == 1
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"run.json"}
    tuned = load_pruned(out).state_dict()
    assert {n: t.shape for n, t in plain.items()} == {n: t.shape for n, t in tuned.items()}
    assert torch.equal(plain["model.norm.weight"], tuned["model.norm.weight"])
    assert not torch.equal(plain["model.layers.2.mlp.down_proj.weight"], tuned["model.layers.2.mlp.down_proj.weight"])
    assert "recovered" in capsys.readouterr().out
    # a second recover over it needs --overwrite, and then replaces it (it is a prunekit output)
    assert main(["recover", str(pruned_dir), "--output", str(out), *_options()]) == 2
    assert main(["recover", str(pruned_dir), "--output", str(out), "--overwrite", *_options(), "-o", "epochs=1"]) == 0
    assert json.loads((out / "run.json").read_text())["recovery"]["info"]["epochs"] == 1


@pytest.mark.parametrize("extra, message", [
    (["-o", "rank=8"], "recovery.options.rank"),
    (["-o", "fsdp=sideways"], "recovery.options.fsdp"),
    (["-o", "deepspeed=/no/zero3.json"], "recovery.options.deepspeed"),
    (["-o", "per_device_batch_size=0"], "recovery.options.per_device_batch_size"),
    (["--recovery", "qlora"], "recovery: unknown name 'qlora'"),
])
def test_recover_refuses_bad_input_before_loading(pruned_dir, tmp_path, capsys, extra, message):
    assert main(["recover", str(pruned_dir), "--output", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_recover_never_writes_into_its_input(pruned_dir, tmp_path, capsys):
    before = _digest(pruned_dir)
    assert main(["recover", str(pruned_dir), "--output", str(pruned_dir / "inner"), *_options()]) == 2
    assert main(["recover", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "output:" in capsys.readouterr().err and _digest(pruned_dir) == before


@pytest.mark.distributed
def test_recover_data_parallel_under_accelerate_launch(pruned_dir, tmp_path):
    """Two gloo processes on the CPU: both train, the main process alone writes the output."""
    out = tmp_path / "ddp"
    # accelerate 1.15 launches several --cpu processes only through mpirun; its torchrun launcher (--multi_gpu)
    # with ACCELERATE_USE_CPU runs them on the CPU with gloo, on machines with or without GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_PROGRESS": "0", "ACCELERATE_USE_CPU": "true"}
    started = time.perf_counter()
    # `python -m accelerate.commands.launch` is `accelerate launch` with this interpreter (a copied venv's
    # `accelerate` script may name another one)
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", "0",
                           "-m", "prunekit.cli", "recover", str(pruned_dir), "--output", str(out), *_options()],
                          env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "run.json").read_text())
    info = manifest["recovery"]["info"]
    assert info["processes"] == 2 and info["steps"] == 2  # 8 examples over 2 processes x 4 per pass x 2 epochs
    assert info["loss_last_epoch"] < info["loss_first_epoch"]
    assert done.stdout.count("recovered ") == 1  # only the main process reports and saves
    assert not list(tmp_path.glob(".ddp.*"))  # no scratch or lock left beside the output
    load_pruned(out)
    print(f"accelerate launch, 2 CPU processes: {seconds:.1f} s")
