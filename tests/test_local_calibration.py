"""Calibration text from a local file or folder, recorded in run.json like the named sources."""

from __future__ import annotations

import hashlib
import json

from conftest import WORDS, make_tiny_tokenizer

from prunekit.cli import main
from prunekit.data.sources import calibration_batches


def _corpus(folder, n_files=3):
    folder.mkdir()
    for i in range(n_files):
        words = [WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(120)]
        (folder / f"part{i}.txt").write_text(" ".join(words))
    (folder / "notes.md").write_text("ignored: not a .txt file")
    return folder


def test_file_and_folder_sources_with_provenance(tmp_path):
    folder = _corpus(tmp_path / "corpus")
    tok = make_tiny_tokenizer()
    ids, info = calibration_batches(tok, source=str(folder), n_samples=4, seq_len=16, seed=1)
    assert ids.shape == (4, 16)
    digest = hashlib.sha256(b"".join((folder / f"part{i}.txt").read_bytes() for i in range(3))).hexdigest()
    assert info["source"] == "local" and info["location"] == str(folder.resolve())
    assert info["variant"] == f"local folder, 3 file(s), sha256 {digest}" and info["seed"] == 1
    again, _ = calibration_batches(tok, source=str(folder), n_samples=4, seq_len=16, seed=1)
    assert ids.equal(again)
    single, file_info = calibration_batches(tok, source=str(folder / "part0.txt"), n_samples=2, seq_len=16, seed=1)
    assert single.shape == (2, 16) and file_info["variant"].startswith("local file, 1 file(s)")


def test_run_calibrates_on_a_local_folder(tiny_model_dir, tmp_path, capsys):
    folder = _corpus(tmp_path / "corpus")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"selection:\n  layers: [0, 4]\ncalibration:\n  source: {folder}\n  n_samples: 4\n  seq_len: 16\n")
    out = tmp_path / "out"
    assert main(["run", "--no-eval", "--method", "taylor", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(out), "--config", str(cfg)]) == 0
    calibration = json.loads((out / "run.json").read_text())["calibration"]
    assert calibration["location"] == str(folder.resolve()) and calibration["n_samples"] == 4
    assert "sha256" in calibration["variant"] and len(calibration["starts"]) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.write_text(f"calibration:\n  source: {empty}\n")
    assert main(["run", "--no-eval", "--method", "taylor", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "o2"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("prunekit: error: calibration.source: folder") and "holds no *.txt files" in last
    assert not (tmp_path / "o2").exists()
