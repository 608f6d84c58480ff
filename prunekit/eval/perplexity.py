"""Windowed perplexity: a split tokenized once, cut into non-overlapping windows, evenly spaced when capped, with a
standard error."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from prunekit.data.sources import SOURCES, load_text, token_ids
from prunekit.data.text import Text
from prunekit.errors import UserError
from prunekit.runtime.devices import input_device
from prunekit.runtime.modelstate import eval_mode
from prunekit.runtime.progress import progress_bar


def _resolve_text(text_or_source: str | Text, split: str, data_dir: str | os.PathLike | None) -> Text:
    """A Text from a source name ('ptb', 'wikitext2', ...), an already loaded Text, or a raw string."""
    if isinstance(text_or_source, Text):
        return text_or_source
    if text_or_source in SOURCES:
        return load_text(text_or_source, split, data_dir)
    if len(text_or_source) < 64 and not any(c.isspace() for c in text_or_source):
        raise UserError(f"perplexity data: {text_or_source!r} is not a source ({', '.join(SOURCES)}) "
                        f"and too short to be the text itself")
    return Text(text_or_source, "custom", "-", "caller-supplied text", "in memory")


def window_nlls(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed float32 next-token NLL of each window of a batch [B, T] (a CPU tensor of B values)."""
    logits = model(input_ids=windows.to(input_device(model)), use_cache=False).logits.float()
    targets = windows[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).sum(dim=1).double().cpu()


def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """Summed float32 next-token NLL of a batch of token windows [B, T], and the number of predicted tokens."""
    return float(window_nlls(model, windows).sum()), windows.shape[0] * (windows.shape[1] - 1)


def spaced_windows(available: int, wanted: int | None) -> list[int]:
    """Indices of ``wanted`` windows spread evenly over ``available`` (the middle of each of ``wanted`` equal
    strata), or all of them; a cap then samples the whole text instead of its beginning."""
    if wanted is None or wanted >= available:
        return list(range(available))
    return [((2 * i + 1) * available) // (2 * wanted) for i in range(wanted)]


def token_windows(ids: torch.Tensor, window: int, max_windows: int | None = None) -> torch.Tensor:
    """The non-overlapping ``window``-token windows of a token stream [N] as a tensor [W, window]: all of them,
    or ``max_windows`` chosen by :func:`spaced_windows`. The CLI, the API and the benchmarks all use this cut."""
    available = ids.numel() // window
    chosen = torch.tensor(spaced_windows(available, max_windows), dtype=torch.long)
    return ids[: available * window].view(available, window)[chosen]


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, text_or_source: str | Text, window: int = 128,
               batch_size: int = 8, max_windows: int | None = None, progress: bool = True, split: str = "test",
               data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Perplexity over non-overlapping `window`-token windows of a text or a named source's split.

    Returns ppl and its standard error, the mean NLL and its standard error, n_windows, n_tokens (tokens
    fed), n_predicted, window, which windows were used, the data description and the wall time.
    `max_windows` keeps that many windows evenly spaced over the split (the quick setting); None uses all.
    The standard error treats the windows as a sample: sd(per-window mean NLL) / sqrt(n), carried to
    perplexity by the delta method (se_ppl = ppl * se_nll).
    """
    if window < 2 or batch_size < 1:
        raise UserError(f"perplexity needs window >= 2 and batch_size >= 1 (got {window}, {batch_size})")
    text = _resolve_text(text_or_source, split, data_dir)
    ids = token_ids(tokenizer, text)
    available = ids.numel() // window
    if available < 1:
        raise UserError(f"{text.source}: {ids.numel()} tokens is less than one window of {window}")
    windows, chosen = token_windows(ids, window, max_windows), spaced_windows(available, max_windows)
    n_windows, per_window = len(windows), window - 1
    sums: list[float] = []
    started = time.perf_counter()
    with eval_mode(model), progress_bar(progress) as bar:
        job = bar.add_task(f"perplexity {text.source}", total=n_windows)
        for first in range(0, n_windows, batch_size):
            sums += window_nlls(model, windows[first:first + batch_size]).tolist()
            bar.advance(job, min(batch_size, n_windows - first))
    predicted = n_windows * per_window
    nll_mean = sum(sums) / predicted
    nll_se = mean_stderr([s / per_window for s in sums])
    ppl = math.exp(nll_mean)
    selection = {"method": "all" if n_windows == available else "evenly spaced", "available": available}
    if n_windows < available:
        selection["indices"] = chosen
    return {"ppl": ppl, "ppl_stderr": None if nll_se is None else ppl * nll_se, "nll_mean": nll_mean,
            "nll_stderr": nll_se, "n_windows": n_windows, "n_tokens": n_windows * window, "n_predicted": predicted,
            "window": window, "window_selection": selection, "tokens_in_split": int(ids.numel()),
            "data": text.describe(), "seconds": round(time.perf_counter() - started, 2)}
