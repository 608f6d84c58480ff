"""Inference throughput at batch 1: prefill tokens/s over a prompt and decode tokens/s with the KV cache."""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    """Wait for queued accelerator work so wall-clock timing is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def once(model: torch.nn.Module, prompt: torch.Tensor, decode_len: int) -> tuple[float, float]:
    """Seconds for one prefill of ``prompt`` and for ``decode_len`` greedy single-token steps after it."""
    device = prompt.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - start
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode_len):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, time.perf_counter() - start


def compare(models: dict[str, torch.nn.Module], vocab: int, prompt_len: int, decode_len: int, repeats: int,
            seed: int = 0) -> dict[str, dict]:
    """Median prefill and decode tokens/s of each model, measured interleaved in this process after a warm-up."""
    device = next(next(iter(models.values())).parameters()).device
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    for model in models.values():
        once(model.eval(), prompt, min(4, decode_len))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(once(model, prompt, decode_len))
    return {name: {"prefill_tokens_per_s": prompt_len / statistics.median(t[0] for t in ts),
                   "decode_tokens_per_s": decode_len / statistics.median(t[1] for t in ts),
                   "prompt_len": prompt_len, "decode_len": decode_len, "repeats": repeats}
            for name, ts in times.items()}


def ratios(result: dict[str, dict], pruned: str, dense: str = "dense") -> dict[str, float]:
    """Pruned / dense throughput ratios (above 1: the pruned model is faster)."""
    return {key.replace("_tokens_per_s", "_speedup"): result[pruned][key] / result[dense][key]
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
