"""Mixtures of text sources for calibration, repair and recovery (prunekit/data/mixture.py)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import make_tiny_tokenizer
from test_local_calibration import _corpus

from prunekit.builtin.lora import LoraOptions
from prunekit.builtin.repair import RefitOptions
from prunekit.cli import main
from prunekit.data.mixture import parse_mixture, part_seed, split_count
from prunekit.data.sources import calibration_batches, load_text, recovery_texts
from prunekit.errors import UserError


def test_parse_gives_normalised_shares_and_one_line_errors(tmp_path):
    assert parse_mixture("pd-books+ptb") == [("pd-books", 0.5), ("ptb", 0.5)]
    assert parse_mixture("3*pd-books + 1*ptb") == [("pd-books", 0.75), ("ptb", 0.25)]
    assert parse_mixture("ptb") == [("ptb", 1.0)]
    plus = tmp_path / "a+b.txt"
    plus.write_text("a file whose name has a plus")
    assert parse_mixture(str(plus)) == [(str(plus), 1.0)]  # an existing path is one source
    for bad, message in [("x*ptb+pd-books", "the share before '*' is not a number"), ("ptb+", "has an empty part"),
                         ("0*ptb+pd-books", "a share must be a positive number"),
                         ("nan*ptb+pd-books", "a share must be a positive number"),
                         ("ptb+pd-books+ptb", "'ptb' appears twice")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_mixture(bad)


@pytest.mark.parametrize("n, shares, counts", [(10, [0.5, 0.5], [5, 5]), (7, [0.5, 0.5], [4, 3]),
                                               (10, [0.7, 0.2, 0.1], [7, 2, 1]), (2, [0.6, 0.2, 0.2], [1, 1, 0])])
def test_split_count_sums_to_n_by_largest_remainder(n, shares, counts):
    assert split_count(n, shares) == counts


def test_calibration_windows_come_from_each_part_by_its_share(tmp_path):
    folder = _corpus(tmp_path / "corpus")
    tok = make_tiny_tokenizer()
    ids, info = calibration_batches(tok, source=f"3*{folder}+ptb", n_samples=8, seq_len=16, seed=5)
    assert ids.shape == (8, 16) and info["variant"] == "mixture" and info["source"] == f"3*{folder}+ptb"
    local, ptb = info["parts"]
    assert (local["n_samples"], local["share"], ptb["n_samples"], ptb["share"]) == (6, 0.75, 2, 0.25)
    alone, _ = calibration_batches(tok, source=str(folder), n_samples=6, seq_len=16, seed=part_seed(5, 0))
    assert ids[:6].equal(alone)  # part 0's windows are its own seeded draw
    assert info["starts"] == local["starts"] + ptb["starts"]
    again, _ = calibration_batches(tok, source=f"3*{folder}+ptb", n_samples=8, seq_len=16, seed=5)
    assert ids.equal(again)


def test_recovery_texts_mix_the_parts_and_shuffle_them():
    texts = recovery_texts("pd-books+ptb", n=10, seed=3)
    books, ptb = set(recovery_texts("pd-books", n=5, seed=part_seed(3, 0))), set(recovery_texts("ptb", n=5,
                                                                                                 seed=part_seed(3, 1)))
    assert set(texts) == books | ptb and len(texts) == 10
    assert texts != sorted(texts, key=lambda t: t not in books)  # interleaved, not books then PTB
    assert texts == recovery_texts("pd-books+ptb", n=10, seed=3)


def test_options_accept_mixtures_and_local_text_and_name_the_bad_part(tmp_path):
    assert LoraOptions(source="pd-books+ptb").source == "pd-books+ptb"
    folder = _corpus(tmp_path / "corpus")
    assert LoraOptions(source=str(folder)).source == str(folder)  # recovery reads local text like calibration
    assert len(recovery_texts(str(folder), n=1, seed=0, min_words=1)) == 1
    assert RefitOptions(source="0.8*pd-books+0.2*ptb").source == "0.8*pd-books+0.2*ptb"
    with pytest.raises(ValueError, match="'nope' is neither a named source"):
        LoraOptions(source="pd-books+nope")
    with pytest.raises(UserError, match="is a mixture: .* need one source"):
        load_text("pd-books+ptb")


def test_run_calibrates_on_a_mixture_and_records_its_parts(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"  # --calibration sets the source and keeps the file's other calibration settings
    cfg.write_text("selection:\n  layers: [0, 4]\ncalibration:\n  source: ptb\n  n_samples: 4\n  seq_len: 16\n")
    out = tmp_path / "out"
    assert main(["run", "--no-eval", "--method", "taylor", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(out), "--config", str(cfg), "--calibration", "pd-books+ptb"]) == 0
    calibration = json.loads((out / "run.json").read_text())["calibration"]
    assert [(p["source"], p["n_samples"]) for p in calibration["parts"]] == [("pd-books", 2), ("ptb", 2)]
    assert main(["run", "--no-eval", "--method", "taylor", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "o2"), "--calibration", "pd-books+2*nope"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("prunekit: error: calibration.source:") and "'nope' is neither a named source" in last
    assert not (tmp_path / "o2").exists()
