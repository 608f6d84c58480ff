"""Scoring precision study: memory of scoring a bf16 model in its own dtype, and how far bf16 scoring moves
the mask and the perplexity from float32 scoring (docs/precision.md).

``python -m prunekit.benchmarks.studies.precision memory [--device cpu]``: peak memory above the loaded model (RSS
on CPU, ``max_memory_allocated`` on CUDA), in units of the model's own size, of ``api.score`` on a
random-weight LLaMA shaped like SmolLM2-135M, one fresh process per (method, dtype, compute_dtype).
``python -m prunekit.benchmarks.studies.precision quality``: the default model loaded in float32 and in bf16,
scored with each method; removed-set IoU (ratio 0.25) and PTB-test perplexity of both pruned models on
evenly spaced 128-token windows (each mask applied to the float32 model, so only the mask differs).
Results are printed as JSON lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

SMOL = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_llama(shape: dict[str, Any], dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight LlamaForCausalLM built directly in ``dtype`` on ``device`` (no float32 detour)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=2048, **shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct parameters in their own dtype."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def measure_memory(method: str, dtype: str, compute_dtype: str, device: str, threads: int,
                   n_samples: int = 10, seq_len: int = 64, batch_size: int = 2,
                   shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """In this process: build the model (``shape``: LlamaConfig fields, default SmolLM2-135M's), then score
    once under a peak-memory probe."""
    from prunekit import api
    from prunekit.benchmarks.memory import PeakRSS
    from prunekit.data.sampling import RandomTokenSampler

    torch.set_num_threads(threads)
    shape = shape or SMOL
    model = random_llama(shape, DTYPES[dtype], device)
    groups = api.build_groups(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (n_samples, seq_len), generator=gen)
    batches = list(ids.split(batch_size))
    size = model_bytes(model)
    prunable = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if n in {s.param_name for g in groups for s in g.slices})
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    with PeakRSS() as mem:
        scores, info = api.score(model, groups, method, batches, compute_dtype=compute_dtype,
                                 sampler=RandomTokenSampler.like(batches, shape["vocab_size"]))
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else mem.delta
    return {"method": method, "dtype": dtype, "compute_dtype": compute_dtype, "device": device,
            "model_bytes": size, "prunable_bytes": prunable, "peak_above_model_bytes": peak,
            "peak_over_model": round(peak / size, 3), "probe": "cuda max_memory_allocated" if cuda else mem.source,
            "seconds": round(seconds, 2), "tokens": n_samples * seq_len, "threads": threads,
            "loss_scale": info.get("loss_scale") or info.get("moreau", {}).get("loss_scale"),
            "finite": all(bool(torch.isfinite(s).all()) for s in scores)}


def in_child(*args: Any) -> dict[str, Any]:
    """:func:`measure_memory` in a fresh spawned process, so no run's peak includes another's."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_memory, *args).result()


def quality(methods: list[str], ratio: float, n_windows: int, threads: int, seed: int = 42) -> list[dict[str, Any]]:
    """Per method: bf16-model vs float32-model scoring of the default model — removed IoU and PTB perplexity."""
    from prunekit import api
    from prunekit.eval.perplexity import token_windows
    from prunekit.core.config import CalibrationConfig
    from prunekit.data.sampling import CalibrationSampler
    from prunekit.data.sources import load_text, token_ids
    from prunekit.eval.perplexity import window_nll
    from prunekit.pipeline.stability import agreement

    torch.set_num_threads(threads)
    wide, tokenizer, _ = api.load_model(None, "float32")
    narrow, _, _ = api.load_model(None, "bfloat16")
    changed = sum(int((p.float() != q).sum()) for p, q in zip(narrow.parameters(), wide.parameters()))
    groups = api.build_groups(wide)
    batches, calibration = api.calibrate(tokenizer, seed=seed)
    c = CalibrationConfig()  # api.calibrate's sample; the sampler serves methods that resample
    sampler = CalibrationSampler(tokenizer, c.source, c.n_samples, c.seq_len, c.batch_size, seed)
    windows = token_windows(token_ids(tokenizer, load_text("ptb", "test")), 128, n_windows)

    def ppl(model: torch.nn.Module) -> float:
        total = count = 0
        with torch.no_grad():
            for first in range(0, len(windows), 8):
                nll, n = window_nll(model, windows[first:first + 8])
                total, count = total + nll, count + n
        return math.exp(total / count)

    out = []
    for method in methods:
        row: dict[str, Any] = {"method": method, "ratio": ratio, "windows": len(windows),
                               "weights_changed_by_bf16_load": changed}
        kept = {}
        for name, model in (("float32", wide), ("bfloat16", narrow)):
            started = time.perf_counter()
            scores, _ = api.score(model, groups, method, batches, seed=seed, sampler=sampler)
            row[f"seconds_{name}"] = round(time.perf_counter() - started, 1)
            kept[name] = api.select(groups, scores, ratio)
            pruned = copy.deepcopy(wide)
            api.apply(pruned, groups, kept[name])
            row[f"ppl_{name}"] = round(ppl(pruned), 3)
            del pruned
        row["removed_iou"] = round(agreement(groups, [kept["float32"], kept["bfloat16"]])["removed_iou"], 4)
        row["loadavg_1m"] = round(os.getloadavg()[0], 2)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunekit.benchmarks.studies.precision", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--methods", default="taylor,moreau-gs")
    mem.add_argument("--runs", default="bfloat16:model,bfloat16:float32,float32:model",
                     help="comma list of DTYPE:COMPUTE_DTYPE")
    mem.add_argument("--device", default="cpu")
    mem.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("quality")
    q.add_argument("--methods", default="taylor,fisher,moreau-gs")
    q.add_argument("--ratio", type=float, default=0.25)
    q.add_argument("--windows", type=int, default=48)
    q.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.suite == "memory":
        for method in args.methods.split(","):
            for run in args.runs.split(","):
                dtype, compute = run.split(":")
                print(json.dumps(in_child(method, dtype, compute, args.device, args.threads)), flush=True)
    else:
        quality(args.methods.split(","), args.ratio, args.windows, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
