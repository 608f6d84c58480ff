"""Quality suite: perplexity (and optionally zero-shot accuracy) of each method's pruned model at several ratios.

Scores do not depend on the ratio, so each (method, seed) is scored once and selected at every ratio.
"""

from __future__ import annotations

import logging
import statistics
import time

from prunekit.benchmarks.metrics import summary
from prunekit.benchmarks.workbench import Workbench

log = logging.getLogger("benchmarks")


def zero_shot_mean(wb: Workbench, model, limit: int | None) -> dict:
    """Mean zero-shot accuracy over prunekit's task list (lm-eval on the local task data)."""
    from prunekit.evaluate import zero_shot

    result = zero_shot(model, wb.tokenizer, limit=limit, batch_size=wb.profile.ppl_batch)
    return {"mean": result.get("mean"), "detail": result}


def dense_zero_shot_mean(wb: Workbench) -> float:
    """Zero-shot mean of the unpruned model, measured once per workbench (every method shares it)."""
    if "zero_shot_mean" not in wb.cache:
        wb.cache["zero_shot_mean"] = zero_shot_mean(wb, wb.model, wb.profile.zero_shot_limit)["mean"]
    return wb.cache["zero_shot_mean"]


def one_seed(wb: Workbench, method: str, ratios: tuple[float, ...], seed: int, zero_shot: bool) -> list[dict]:
    """Pruned perplexities at every ratio for one seed."""
    entry = wb.method(method)
    batches, _ = wb.calibration(seed) if entry.needs_calibration() else ([], None)
    groups = wb.groups(wb.model)
    scores, _, seconds = wb.score(wb.model, groups, method, batches, seed)
    rows = []
    for ratio in ratios:
        pruned = wb.pruned(wb.model, groups, wb.keep(groups, scores, ratio))
        row = {"ratio": ratio, "seed": seed, "params": pruned.num_parameters(),
               "ppl": {c: wb.ppl(pruned, c) for c in wb.profile.quality_corpora}, "score_seconds": seconds}
        if zero_shot:
            row["zero_shot"] = zero_shot_mean(wb, pruned, wb.profile.zero_shot_limit)
        log.info("quality %s seed %d ratio %.2f: %s", method, seed, ratio, row["ppl"])
        rows.append(row)
    return rows


def run(wb: Workbench, method: str, ratios: tuple[float, ...], seeds: list[int], zero_shot: bool = False) -> dict:
    """The quality record of one method: every (seed, ratio) row and per-ratio mean ± spread."""
    started = time.perf_counter()
    rows = [r for seed in seeds for r in one_seed(wb, method, ratios, seed, zero_shot)]
    by_ratio = {}
    for ratio in ratios:
        at = [r for r in rows if r["ratio"] == ratio]
        by_ratio[str(ratio)] = {f"ppl_{c}": summary([r["ppl"][c] for r in at]) for c in wb.profile.quality_corpora}
        by_ratio[str(ratio)]["params"] = statistics.fmean(r["params"] for r in at)
        if zero_shot:
            by_ratio[str(ratio)]["zero_shot_mean"] = summary([r["zero_shot"]["mean"] for r in at])
    dense = {"params": wb.model.num_parameters(), **{f"ppl_{c}": wb.dense_ppl(c) for c in wb.profile.quality_corpora}}
    if zero_shot:
        dense["zero_shot_mean"] = dense_zero_shot_mean(wb)
    return {"suite": "quality", "method": method, "ratios": list(ratios), "seeds": seeds, "rows": rows,
            "by_ratio": by_ratio, "dense": dense, "seconds": round(time.perf_counter() - started, 1)}
