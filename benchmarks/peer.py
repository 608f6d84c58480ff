"""Peer row: torch-pruning's own MetaPruner (group magnitude / group Taylor) next to prunekit on the same model.

Only MLP channels are pruned on both sides: torch-pruning's GQA head pruning is unreliable (it
crashes on SmolLM2's 9q/3kv layout, torch-pruning issue #516), so the comparison is on the block both can prune.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Callable

import torch
import torch_pruning as tp

from prunekit.adapters.grouping import GrouperOptions
from prunekit.benchmarks import speed
from prunekit.benchmarks.metrics import iou
from prunekit.benchmarks.workbench import Workbench

log = logging.getLogger("benchmarks")
PEERS: dict[str, tuple[Callable[[], object], bool, str]] = {
    # name: (importance factory, needs gradients, prunekit counterpart)
    "tp-group-magnitude": (lambda: tp.importance.GroupMagnitudeImportance(p=2), False, "magnitude"),
    "tp-group-taylor": (lambda: tp.importance.GroupTaylorImportance(), True, "taylor"),
}
MLP_ONLY = GrouperOptions(prune_attention=False)


def _gradients(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Leave the mean calibration-loss gradient in every parameter's ``.grad`` (what GroupTaylorImportance reads)."""
    for batch in batches:
        (model(input_ids=batch, labels=batch, use_cache=False).loss / len(batches)).backward()


def tp_prune(wb: Workbench, peer: str, ratio: float, batches: list[torch.Tensor]) -> tuple[torch.nn.Module, float]:
    """A copy of the dense model with MLP channels of the pruned layers removed by torch-pruning's MetaPruner."""
    make_importance, needs_grad, _ = PEERS[peer]
    model = copy.deepcopy(wb.model)
    adapter = wb.adapter(model)
    prunable = {n for layer in wb.layers for n in (adapter.mlp_names(layer).gate, adapter.mlp_names(layer).up)}
    ignored = [m for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and n not in prunable]
    started = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(True)  # the tracer follows autograd
    try:
        with adapter.tracing(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # norms: hidden size is kept
            pruner = tp.pruner.MetaPruner(model, adapter.example_inputs(), make_importance(), pruning_ratio=ratio,
                                          ignored_layers=ignored, forward_fn=adapter.forward_for_trace,
                                          root_module_types=[torch.nn.Linear])
        if needs_grad:
            _gradients(model, batches)
        pruner.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    return model.eval(), time.perf_counter() - started


def kept_mlp_channels(dense: torch.nn.Module, pruned: torch.nn.Module, wb: Workbench) -> dict[int, set[int]]:
    """Per pruned layer, which original MLP channels survive (found by matching gate_proj rows exactly)."""
    out = {}
    for layer in wb.layers:
        name = wb.adapter(dense).mlp_names(layer).gate
        rows = {r.numpy().tobytes(): i for i, r in enumerate(dense.get_submodule(name).weight.detach())}
        out[layer] = {rows[r.numpy().tobytes()] for r in pruned.get_submodule(name).weight.detach()}
    return out


def _mask_iou(a: dict[int, set[int]], b: dict[int, set[int]]) -> float:
    """IoU of kept (layer, channel) pairs."""
    return iou({(layer, c) for layer, cs in a.items() for c in cs}, {(layer, c) for layer, cs in b.items() for c in cs})


def run(wb: Workbench, ratio: float, seeds: list[int]) -> dict:
    """MetaPruner rows and the matching MLP-only prunekit rows: estimation+prune time, size, ppl, speed, mask IoU."""
    seed = seeds[0]
    batches, _ = wb.calibration(seed)
    models: dict[str, torch.nn.Module] = {"dense": wb.model}
    rows: dict[str, dict] = {}
    for peer, (_, _, counterpart) in PEERS.items():
        groups = wb.groups(wb.model, MLP_ONLY)
        started = time.perf_counter()
        scores, _, _ = wb.score(wb.model, groups, counterpart, batches, seed)
        ours = wb.pruned(wb.model, groups, wb.keep(groups, scores, ratio))
        rows[f"prunekit-{counterpart}"] = {"library": "prunekit", "criterion": counterpart,
                                           "seconds": time.perf_counter() - started}
        models[f"prunekit-{counterpart}"] = ours
        try:
            theirs, seconds = tp_prune(wb, peer, ratio, batches)
        except Exception as exc:  # the peer's failure is a result, not a crash of the harness
            rows[peer] = {"library": "torch-pruning", "criterion": counterpart,
                          "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        rows[peer] = {"library": "torch-pruning", "criterion": counterpart, "seconds": seconds,
                      "mask_iou_vs_prunekit": _mask_iou(kept_mlp_channels(wb.model, theirs, wb),
                                                        kept_mlp_channels(wb.model, ours, wb))}
        models[peer] = theirs
    for name, model in models.items():
        if name != "dense":
            rows[name]["params"] = model.num_parameters()
            rows[name]["ppl"] = {c: wb.ppl(model, c) for c in wb.profile.quality_corpora}
            log.info("peer %s: %s", name, rows[name]["ppl"])
    p = wb.profile
    tput = speed.compare(models, wb.model.config.vocab_size, p.prompt_len, p.decode_len, p.speed_repeats, seed)
    for name in rows:
        if name in tput:
            rows[name]["throughput"] = tput[name]
            rows[name]["speedup"] = speed.ratios(tput, name)
    dense = {"params": wb.model.num_parameters(), "ppl": {c: wb.dense_ppl(c) for c in p.quality_corpora},
             "throughput": tput["dense"]}
    return {"suite": "peer", "ratio": ratio, "seed": seed, "blocks": "mlp", "rows": rows, "dense": dense,
            "notes": ["MLP channels only on both sides: torch-pruning's GQA head pruning is unreliable "
                      "(FIELD-NOTES, torch-pruning issue #516)",
                      "seconds: importance estimation plus torch-pruning's graph construction and pruning"]}
