"""Third-party chatter during an evaluation (lm-eval's, datasets', transformers' warnings, log lines and progress
bars) kept out of prunekit's output: captured, recorded with the metrics, shown live with ``--verbose``.

lm-eval logs about ten lines per evaluation that say nothing about the model ("`pretrained` model kwarg is not
of type `str`", "Overwriting default num_fewshot ..." per task) and datasets draws a bar per split it reads;
in a terminal they tear the before/after table apart, in a log they bury it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

VERBOSE_ENV = "PRUNEKIT_VERBOSE"
# Loggers of the libraries an evaluation runs (their children included).
THIRD_PARTY = ("lm_eval", "datasets", "transformers", "huggingface_hub", "accelerate", "evaluate", "fsspec",
               "filelock", "urllib3", "sqlitedict", "absl", "peft", "torch", "numexpr", "tokenizers")
MAX_KEPT = 50  # distinct messages kept for the record


def verbose() -> bool:
    """``--verbose`` (``PRUNEKIT_VERBOSE=1``): let third-party output through as it happens."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


class _Collect(logging.Handler):
    """Keeps every record it is handed (formatted ``LEVEL name: message``)."""

    def __init__(self, lines: list[str]):
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")
        except Exception:  # a record whose arguments do not format: keep the template
            self.lines.append(f"{record.levelname} {record.name}: {record.msg}")


def summarize(lines: list[str]) -> list[str]:
    """Distinct captured lines in order of first appearance, repeated ones counted (``(×7)``), at most MAX_KEPT."""
    counts = Counter(lines)
    out = [line if counts[line] == 1 else f"{line} (x{counts[line]})" for line in dict.fromkeys(lines)]
    return out[:MAX_KEPT] + ([f"... and {len(out) - MAX_KEPT} more"] if len(out) > MAX_KEPT else [])


@contextmanager
def third_party_output() -> Iterator[list[str]]:
    """Capture third-party log records and Python warnings, and turn off datasets', transformers' and the hub's
    progress bars, for the duration; yields the list the captured lines collect in. With :func:`verbose`
    nothing is captured (the list stays empty) and everything is shown as it happens."""
    lines: list[str] = []
    if verbose():
        yield lines
        return
    handler = _Collect(lines)
    saved = []
    for name in THIRD_PARTY:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    last_resort, logging.lastResort = logging.lastResort, handler  # records of loggers nobody configured
    bars = _bars_off()
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters in force decide what is recorded
            try:
                yield lines
            finally:
                lines.extend(f"WARNING {w.category.__name__}: {w.message}" for w in caught)
    finally:
        for restore in bars:
            restore()
        logging.lastResort = last_resort
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


def _bars_off() -> list:
    """Turn off the progress bars of datasets, transformers and huggingface_hub; returns how to turn them back."""
    restore = []
    for module, is_on, off, on in (("datasets", "is_progress_bar_enabled", "disable_progress_bars",
                                    "enable_progress_bars"),
                                   ("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar",
                                    "enable_progress_bar"),
                                   ("huggingface_hub.utils", "are_progress_bars_disabled", "disable_progress_bars",
                                    "enable_progress_bars")):
        try:
            import importlib

            lib = importlib.import_module(module)
            enabled = getattr(lib, is_on)()
            if is_on.startswith("are_"):  # huggingface_hub asks the opposite question
                enabled = not enabled
        except (ImportError, AttributeError):
            continue
        if enabled:
            getattr(lib, off)()
            restore.append(getattr(lib, on))
    return restore
