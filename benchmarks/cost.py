"""Cost suite: estimation wall time and peak memory per method (one fresh process each), pruned size and speed."""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch

from prunekit.benchmarks import speed
from prunekit.benchmarks.memory import PeakRSS
from prunekit.benchmarks.profiles import Profile
from prunekit.benchmarks.workbench import Workbench

log = logging.getLogger("benchmarks")


def _model_bytes(model: torch.nn.Module) -> int:
    """Size of the model's distinct parameters in float32."""
    return 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def measure(model: str | None, method: str, ratio: float, seed: int, profile: Profile, device: str,
            threads: int) -> dict:
    """In the current process: estimate once under a peak-memory probe, prune, and time dense vs pruned."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    wb = Workbench.open(model, profile, device)
    entry = wb.method(method)
    groups = wb.groups(wb.model)
    batches, _ = wb.calibration(seed) if entry.needs_calibration() else ([], None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        scores, info, seconds = wb.score(wb.model, groups, method, batches, seed)
    options = entry.options({}).model_dump(mode="json")
    pruned = wb.pruned(wb.model, groups, wb.keep(groups, scores, ratio))
    p = wb.profile
    tput = speed.compare({"dense": wb.model, "pruned": pruned}, wb.model.config.vocab_size, p.prompt_len,
                         p.decode_len, p.speed_repeats, seed)
    model_bytes = _model_bytes(wb.model)
    out = {"method": method, "estimation_seconds": seconds, "iterations": options.get("iterations"),
           "noise_samples": options.get("noise_samples"), "options": options, "method_info": info,
           "peak_rss_delta_bytes": mem.delta, "peak_rss_bytes": mem.peak, "rss_before_bytes": mem.baseline,
           "memory_probe": mem.source, "model_float32_bytes": model_bytes,
           "peak_delta_over_model": mem.delta / model_bytes,
           "params_dense": wb.model.num_parameters(), "params_pruned": pruned.num_parameters(),
           "throughput": tput, "speedup": speed.ratios(tput, "pruned"),
           "calibration_tokens": sum(b.numel() for b in batches),
           "pid": os.getpid(), "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def in_child(model: str | None, method: str, ratio: float, seed: int, profile: Profile, device: str,
             threads: int) -> dict:
    """:func:`measure` in a fresh spawned process, so one method's peak never includes another's."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, model, method, ratio, seed, profile, device, threads).result()


def run(wb: Workbench, method: str, ratio: float, seeds: list[int], model: str | None, isolate: bool = True) -> dict:
    """The cost record of one method (first seed); ``isolate`` runs it in its own process."""
    seed = seeds[0]
    fn = in_child if isolate else measure
    log.info("cost %s in %s", method, "a child process" if isolate else "this process")
    result = fn(model, method, ratio, seed, wb.profile, wb.device, torch.get_num_threads())
    return {"suite": "cost", "method": method, "ratio": ratio, "seed": seed, "isolated": isolate, **result}


def derived(records: list[dict]) -> dict:
    """Cross-method ratios: moreau-gs (and moreau) time per iteration over taylor's, and memory over model size."""
    by = {r["method"]: r for r in records if "estimation_seconds" in r}
    out: dict = {"peak_delta_over_model": {m: r["peak_delta_over_model"] for m, r in by.items()}}
    if "taylor" in by:
        base = by["taylor"]["estimation_seconds"]
        out["time_over_iterations_x_taylor"] = {
            m: r["estimation_seconds"] / (r["iterations"] * base)
            for m, r in by.items() if r.get("iterations")}
    return out


def allocation_throughput(wb: Workbench, method: str, fractions: tuple[float, ...], allocations, seed: int,
                          probe: dict | None = None) -> dict:
    """Pruned / dense prefill and decode throughput of each allocation at equal parameters removed (heads and
    MLP channels do not cost the same time), measured interleaved with the dense model in this process."""
    from prunekit.benchmarks.quality import AllocationBench

    bench = AllocationBench(wb, method, seed, probe)
    models, meta = {"dense": wb.model}, {}
    for fraction in fractions:
        for label, allocator, options, layers in allocations:
            idx, counts, _ = bench.counts(allocator, options, layers, fraction)
            name = f"{label}@{fraction}"
            models[name] = bench.pruned(idx, counts)
            meta[name] = {"allocation": label, "budget": fraction,
                          "params_removed_fraction": 1 - models[name].num_parameters() / wb.model.num_parameters()}
    p = wb.profile
    tput = speed.compare(models, wb.model.config.vocab_size, p.prompt_len, p.decode_len, p.speed_repeats, seed)
    rows = [{**m, "throughput": tput[name], **speed.ratios(tput, name)} for name, m in meta.items()]
    for r in rows:
        log.info("throughput %s @ %.3f: prefill x%.3f decode x%.3f", r["allocation"], r["budget"],
                 r["prefill_speedup"], r["decode_speedup"])
    return {"suite": "cost-allocation", "method": method, "seed": seed, "device": str(wb.device),
            "dense": tput["dense"], "rows": rows}
