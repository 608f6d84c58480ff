"""Stability as a feature: score K calibration resamples, report how much their decisions agree, prune by consensus.

With only a few hundred calibration tokens, which units a gradient method removes depends mostly on
which sentences were drawn (the removed-set overlap across calibration seeds was ≈ 0.47 at 640 tokens
on SmolLM2, docs/stability.md).
``stability: K`` scores the loaded model on K seeded calibration samples (draw 0 is the run's
own sample, draws 1..K-1 come from :class:`prunekit.data.sampling.CalibrationSampler`), reports the
per-layer overlap of the removed units and the number of *undecided* units (removed in some but not
all resamples), and prunes with the consensus: the mean over resamples of each group's scores divided
by their sum (so every resample weighs the same whatever its gradient scale). K = 1 is a plain run.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import torch

from prunekit.core.groups import PruningGroup
from prunekit.core.select import select
from prunekit.data.sampling import CalibrationSampler


def normalised(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each group's scores divided by their sum (left as they are where the sum is 0)."""
    out = []
    for s in scores:
        s = s.double()
        total = s.sum()
        out.append(s / total if total != 0 else s)
    return out


def consensus(runs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Mean over resamples of the per-group normalised scores (float32, one tensor per group)."""
    per_run = [normalised(r) for r in runs]
    return [torch.stack(group).mean(0).float() for group in zip(*per_run)]


def removed_units(groups: list[PruningGroup], kept: list[torch.Tensor]) -> list[set[int]]:
    """Per group, the set of removed unit indices."""
    return [set(range(g.n_units)) - set(k.tolist()) for g, k in zip(groups, kept)]


def _iou(a: set, b: set) -> float:
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def agreement(groups: list[PruningGroup], masks: list[list[torch.Tensor]]) -> dict[str, Any]:
    """Per-layer and overall mean pairwise IoU of the removed units, and the undecided units.

    A unit is undecided when some but not all resamples remove it. With one resample every IoU is 1.
    """
    removed = [removed_units(groups, kept) for kept in masks]  # [resample][group] -> set
    layers = sorted({g.layer for g in groups})

    def units(r: int, which: list[int]) -> set[tuple[int, int]]:
        return {(i, u) for i in which for u in removed[r][i]}

    def mean_iou(which: list[int]) -> float:
        pairs = list(itertools.combinations(range(len(masks)), 2))
        return 1.0 if not pairs else statistics.fmean(_iou(units(a, which), units(b, which)) for a, b in pairs)

    every = list(range(len(groups)))
    undecided_per_layer: dict[str, int] = {}
    total_undecided = 0
    for layer in layers:
        which = [i for i, g in enumerate(groups) if g.layer == layer]
        sets = [units(r, which) for r in range(len(masks))]
        count = len(set.union(*sets) - set.intersection(*sets))
        undecided_per_layer[str(layer)] = count
        total_undecided += count
    return {
        "removed_iou": mean_iou(every),
        "removed_iou_per_layer": {str(layer): mean_iou([i for i, g in enumerate(groups) if g.layer == layer])
                                  for layer in layers},
        "undecided_units": total_undecided,
        "undecided_per_layer": undecided_per_layer,
        "removed_per_resample": [sum(len(s) for s in r) for r in removed],
    }


def score(ctx, entry, options, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """The pipeline's scoring stage: plain scores (K = 1) or the consensus of ``ctx.config.stability`` resamples.

    Every resample uses the run's method seed; only the calibration text changes. Returns the scores
    to select with and the method's info, with a ``stability`` report added when K > 1.
    """
    from prunekit.pipeline.stages import score as api_score  # the API imports this module

    config = ctx.config
    k = getattr(config, "stability", 1)
    sampler = (CalibrationSampler.from_config(ctx.tokenizer, config)
               if entry.needs_calibration(options) and ctx.tokenizer is not None else None)
    if k <= 1 or sampler is None:
        scores, info = api_score(ctx.model, ctx.groups, entry.name, batches, options=options, seed=config.seed,
                                 compute_dtype=getattr(config, "compute_dtype", None),
                                 registry=ctx.registry, sampler=sampler)
        if k > 1:
            info["stability"] = {"resamples": k, "note": f"{entry.name} uses no calibration text: "
                                                          "every resample gives the same scores"}
        return scores, info
    runs, infos, seeds = [], [], []
    for r in range(k):
        sample = batches if r == 0 else sampler(r)[0]
        child = sampler.child(r)
        scores, info = api_score(ctx.model, ctx.groups, entry.name, sample, options=options, seed=config.seed,
                                 compute_dtype=getattr(config, "compute_dtype", None),
                                 registry=ctx.registry, sampler=child)
        runs.append(scores)
        infos.append(info)
        seeds.append(child.seed)
    sel = config.selection
    masks = [select(ctx.groups, s, config.ratio, sel.scope, sel.round_to) for s in runs]
    agreed = consensus(runs)
    final = select(ctx.groups, agreed, config.ratio, sel.scope, sel.round_to)
    report = {"resamples": k, "calibration_seeds": seeds, **agreement(ctx.groups, masks),
              "consensus_removed_iou_vs_each": [agreement(ctx.groups, [final, m])["removed_iou"] for m in masks],
              "scores": "mean over resamples of each group's scores divided by their sum"}
    info = dict(infos[0])
    info["stability"] = report
    info["resample_infos"] = infos[1:]
    return agreed, info
