"""``pd-books``: a generic, public-domain English calibration text that ships with prunekit.

Every calibration, probe and recovery text used to be PTB (news, ``<unk>``-tokenized), so a gain measured
on PTB test was partly domain adaptation. ``pd-books`` is five public-domain books of different kinds
(novels, short stories, political essays; 1787-1895), the Project Gutenberg transcriptions with every
reference to Project Gutenberg removed (licence note: ``prunekit/data/corpora/pd-books/LICENSE.md``).

The two splits are disjoint **by book**: ``train`` is Pride and Prejudice, Frankenstein, The Adventures of
Sherlock Holmes and The Federalist Papers; ``validation`` is The Time Machine. One paragraph per line in
``<split>.txt``; :func:`pd_books` returns the paragraphs as documents; ``load_text("pd-books", split)`` is
the named source (calibration, repair and recovery text that is neither PTB nor WikiText-2).

:func:`clean_gutenberg` is the exact cleaning that made the files (``prunekit/data/corpora/pd-books/README.md``
says from which source files).
"""

from __future__ import annotations

import re
from pathlib import Path

from prunekit.data.text import Text

NAME = "pd-books"
SPLITS = ("train", "validation")
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE)
_END = re.compile(r"^(End of (the )?Project Gutenberg|\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK)",
                  re.MULTILINE | re.IGNORECASE)
_ILLUSTRATION = re.compile(r"\[Illustration[^\]]*\]", re.IGNORECASE)


def corpus_dir() -> Path:
    """Where the packaged text lives (``prunekit/data/corpora/pd-books``)."""
    return Path(__file__).resolve().parent / "corpora" / NAME


def clean_gutenberg(raw: str) -> list[str]:
    """The paragraphs of one Project Gutenberg plain-text book, without anything Project Gutenberg added.

    Keeps the body between the ``*** START OF ...`` and ``*** END OF ...`` / ``End of the Project
    Gutenberg ...`` lines, drops the transcribers' "Produced by" credit, illustration markers and
    ``_italics_`` underscores, joins each paragraph's wrapped lines into one line and collapses runs of
    spaces. Raises if a paragraph still names Project Gutenberg.
    """
    raw = raw.replace("\r\n", "\n").lstrip("\ufeff")
    start, end = _START.search(raw), _END.search(raw)
    if start is None or end is None or end.start() <= start.end():
        raise ValueError("not a Project Gutenberg text: no START/END markers")
    body = _ILLUSTRATION.sub("", raw[start.end():end.start()]).replace("_", "")
    paragraphs = []
    for block in re.split(r"\n\s*\n", body):
        text = re.sub(r"\s+", " ", block).strip()
        if not text or text.lower().startswith("produced by"):
            continue
        if "gutenberg" in text.lower():
            raise ValueError(f"paragraph still names Project Gutenberg: {text[:80]!r}")
        paragraphs.append(text)
    return paragraphs


def pd_books(split: str = "train", folder: str | Path | None = None) -> list[str]:
    """The documents (paragraphs, in book order) of one split: ``train`` or ``validation`` (aliases
    ``valid``/``val``/``dev``). ``folder`` overrides the packaged copy."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not available for {NAME}; use one of {', '.join(SPLITS)}")
    path = Path(folder or corpus_dir()) / f"{split}.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pd_books_text(split: str = "train", folder: str | Path | None = None, joiner: str = "\n\n") -> Text:
    """The split as a :class:`prunekit.data.text.Text` (documents joined like every other source)."""
    docs = tuple(pd_books(split, folder))
    return Text(joiner.join(docs), NAME, SPLIT_ALIASES.get(split, split),
                "pd-books (5 public-domain books, Project Gutenberg transcriptions, PG references removed)",
                "prunekit package data (public domain)", docs)
