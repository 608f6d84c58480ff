"""Robustness suite: how much a method's kept-unit mask and the pruned model's perplexity move under perturbations.

For each method and seed the dense checkpoint is scored once unperturbed and once per perturbation
(weights rounded to bf16 / fp16, estimation computed in bf16, relative Gaussian weight noise, another
calibration sample); each mask is compared with the unperturbed one and each perturbed model is pruned
with its own mask and evaluated.
"""

from __future__ import annotations

import logging
import time

from prunekit.benchmarks.metrics import compare_masks, summary
from prunekit.benchmarks.perturb import perturbations
from prunekit.benchmarks.workbench import Workbench

log = logging.getLogger("benchmarks")
CORPUS = "ptb"
EVAL_ON_DENSE = ("compute", "calibration")  # these perturb the estimation, not the checkpoint


def one_seed(wb: Workbench, method: str, ratio: float, seed: int) -> dict:
    """All perturbations of one method at one seed, compared with the unperturbed run."""
    batches, calib = wb.calibration(seed)
    groups = wb.groups(wb.model)
    scores, info, seconds = wb.score(wb.model, groups, method, batches, seed)
    base = wb.keep(groups, scores, ratio)
    base_ppl = wb.ppl(wb.pruned(wb.model, groups, base), CORPUS)
    rows = [{"name": "unperturbed", "kind": "none", "iou": 1.0, "flipped": 0, "ppl": base_ppl,
             "score_seconds": seconds}]
    log.info("%s seed %d unperturbed: ppl %.2f (%.1fs)", method, seed, base_ppl, seconds)
    p = wb.profile
    for pert in perturbations(wb.model, seed, p.noise_levels, seed + p.calib_seed_offset, p.perturbations):
        row = pert.describe()
        try:
            row.update(_measure(wb, pert, method, ratio, seed, batches, base, base_ppl))
        except Exception as exc:  # one failing perturbation must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
        log.info("%s seed %d %s: %s", method, seed, pert.name,
                 row.get("error") or f"IoU {row['iou']:.4f}, flipped {row['flipped']}, ppl {row['ppl']:.2f}")
        del pert
    ppls = [r["ppl"] for r in rows if "ppl" in r]
    return {"seed": seed, "calibration": _calib_brief(calib), "method_info": info, "perturbations": rows,
            "ppl_spread": max(ppls) - min(ppls)}


def _measure(wb: Workbench, pert, method: str, ratio: float, seed: int, batches, base, base_ppl: float) -> dict:
    """Score one perturbed copy, compare its mask, evaluate it pruned."""
    if pert.calib_seed is not None:
        batches, _ = wb.calibration(pert.calib_seed)
    groups = wb.groups(pert.model)
    scores, _, seconds = wb.score(pert.model, groups, method, batches, seed, pert.compute_dtype,
                                  calib_seed=pert.calib_seed)
    kept = wb.keep(groups, scores, ratio)
    out = compare_masks(groups, base, kept) | {"score_seconds": seconds}
    target = wb.model if pert.kind in EVAL_ON_DENSE else pert.model
    same_model = target is wb.model or pert.weights_changed == 0
    if same_model and out["flipped"] == 0:
        out["ppl"], out["ppl_reused"] = base_ppl, True  # same weights, same mask: the same pruned model
    else:
        out["ppl"] = wb.ppl(wb.pruned(target, groups, kept), CORPUS)
    return out


def _calib_brief(info: dict) -> dict:
    """The calibration provenance without the per-window offsets."""
    return {k: v for k, v in info.items() if k != "starts"}


def aggregate(seeds: list[dict]) -> dict:
    """Per perturbation, mean ± spread over seeds of IoU, flipped units and perplexity; plus the ppl spread."""
    names = [r["name"] for r in seeds[0]["perturbations"]]  # every seed runs the same list
    table = {}
    for name in names:
        rows = [next(r for r in s["perturbations"] if r["name"] == name) for s in seeds]
        table[name] = {key: summary([r.get(key) for r in rows])
                       for key in ("iou", "iou_attention", "iou_mlp", "flipped", "ppl", "score_seconds")}
        table[name]["level"] = rows[0].get("level")
        table[name]["weights_changed"] = summary([r.get("weights_changed") for r in rows])
        table[name]["errors"] = [r["error"] for r in rows if "error" in r]
    return {"by_perturbation": table, "ppl_spread": summary([s["ppl_spread"] for s in seeds])}


def run(wb: Workbench, method: str, ratio: float, seeds: list[int]) -> dict:
    """The robustness record of one method (every seed plus the aggregate)."""
    started = time.perf_counter()
    per_seed = [one_seed(wb, method, ratio, seed) for seed in seeds]
    return {"suite": "robustness", "method": method, "ratio": ratio, "seeds": seeds, "corpus": CORPUS,
            "dense_ppl": wb.dense_ppl(CORPUS), "per_seed": per_seed, "aggregate": aggregate(per_seed),
            "seconds": round(time.perf_counter() - started, 1),
            "notes": ["estimation in bfloat16 runs the method on a bfloat16 copy of the model (CPU bf16 matmuls); "
                      "its pruned model is the float32 checkpoint pruned with that mask",
                      "the calibration perturbation draws seed + %d" % wb.profile.calib_seed_offset]}
