"""Tokenized corpora cached on disk: same ids as tokenizing, keyed by the tokenizer and the text."""

from __future__ import annotations

import torch

from prunekit.data.tokens import cached_token_ids, tokenizer_fingerprint


def word_tokenizer(extra: tuple[str, ...] = ()):
    """A tiny offline word-level tokenizer; ``extra`` words change its vocabulary (and so its fingerprint)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "the", "market", "was", "new", "and", "price", "rose", *extra]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _tokenize(tok, text):
    return lambda: torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def test_second_read_comes_from_disk_and_equals_tokenizing(tmp_path):
    tok, text = word_tokenizer(), "the market was new and the price rose"
    calls = []

    def tokenize():
        calls.append(1)
        return _tokenize(tok, text)()

    first = cached_token_ids(tok, text, tokenize, root=tmp_path)
    second = cached_token_ids(tok, text, tokenize, root=tmp_path)
    assert calls == [1] and torch.equal(first, second) and second.dtype == torch.long
    assert torch.equal(second, _tokenize(tok, text)())


def test_token_ids_use_the_disk_only_inside_a_run(tmp_path, monkeypatch):
    import prunekit.data.sources as data
    import prunekit.data.tokens as token_cache

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    tok = word_tokenizer()
    text = data.Text("the market was new", "local", "test", "v", "here", ("the market was new",))
    data._TOKEN_CACHE.clear()
    data.token_ids(tok, text)
    assert not (tmp_path / "tokens").exists()  # the API writes no files unless asked
    data._TOKEN_CACHE.clear()
    with token_cache.on_disk():
        ids = data.token_ids(tok, text)
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 1 and ids.tolist() == [1, 2, 3, 4]
    data._TOKEN_CACHE.clear()


def test_key_follows_tokenizer_and_text_and_a_broken_entry_is_a_miss(tmp_path):
    a, b = word_tokenizer(), word_tokenizer(extra=("zebra",))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(word_tokenizer())
    assert tokenizer_fingerprint(object()) is None  # cannot describe itself: never cached
    cached_token_ids(a, "the market", _tokenize(a, "the market"), root=tmp_path)
    cached_token_ids(b, "the market", _tokenize(b, "the market"), root=tmp_path)
    cached_token_ids(a, "the price", _tokenize(a, "the price"), root=tmp_path)
    entries = sorted(tmp_path.glob("*.pt"))
    assert len(entries) == 3
    for entry in entries:
        entry.write_bytes(b"not a tensor")
    again = cached_token_ids(a, "the market", _tokenize(a, "the market"), root=tmp_path)
    assert torch.equal(again, _tokenize(a, "the market")())
