"""llama.cpp speed of the embedded SmolLM2, dense and pruned, exported to GGUF (prunekit/io/gguf.py).

Batch 1, a fixed thread count: prefill tokens/s over a prompt and decode tokens/s through the KV cache,
measured in-process with llama-cpp-python, the models interleaved in every repetition, medians reported
with the 1-minute load average seen during them (other work on the machine slows every figure). Beside
the timings, the physical limit: multiply-adds per token (lm-head included) and weight bytes read per
decoded token, dense over pruned. ``--callgrind`` adds instruction counts (valgrind, one thread), a
noise-free companion figure.

    python -m prunekit.benchmarks.gguf_speed --workdir /tmp/gguf-bench [--threads 1 2] [--repeats 5]

The pruned models are made once in ``--workdir`` (``prunekit.prune`` with moreau-gs, per ``--budgets`` entry the
default ``measured`` allocator and the ``uniform`` one, MLP widths rounded to 32 so that q8_0 and q4_0 can hold
them) and reused by later runs. The markdown table gives each speed-up as a share of the multiply-add limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ALLOCATORS: dict[str, dict] = {"measured": {}, "uniform": {"allocation": {"name": "uniform"}}}


def variants(budgets: list[str]) -> dict[str, dict | None]:
    """The dense model and, per budget (``ratio:R``, LLM-Pruner's per-layer ratio, or ``params:F``, a parameter
    fraction) and allocator, the prune settings; MLP widths rounded to 32 so that q8_0 and q4_0 can hold them."""
    out: dict[str, dict | None] = {"dense": None}
    for budget in budgets:
        kind, _, value = budget.partition(":")
        if kind not in ("ratio", "params"):
            raise SystemExit(f"--budgets: {budget!r} is not ratio:R or params:F")
        for name, settings in ALLOCATORS.items():
            allocation = {**settings.get("allocation", {}), **({"params_removed": float(value)} if kind == "params"
                                                                 else {})}
            out[f"{name}-{kind}{value}"] = {"ratio": float(value) if kind == "ratio" else 0.25,
                                            "selection": {"round_to": 32},
                                            **({"allocation": allocation} if allocation else {})}
    return out


# -- models ------------------------------------------------------------------------------------------------

def prepare(workdir: Path, types: list[str], method: str, budgets: list[str]) -> dict[tuple[str, str], Path]:
    """GGUF files of every variant at every type, made once (pruning is the slow part: minutes)."""
    import torch

    import prunekit
    from prunekit.io.gguf import export_checkpoint, export_gguf

    files: dict[tuple[str, str], Path] = {}
    for name, settings in variants(budgets).items():
        wanted = {t: workdir / f"{name}-{t}.gguf" for t in types}
        if all(p.exists() for p in wanted.values()):
            files.update({(name, t): p for t, p in wanted.items()})
            continue
        checkpoint = workdir / name
        if settings is not None and not (checkpoint / "run.json").exists():
            torch.manual_seed(0)
            model, tokenizer, _ = prunekit.load_model()
            started = time.perf_counter()
            result = prunekit.prune(model, tokenizer, method=method, **settings)
            print(f"{name}: pruned in {time.perf_counter() - started:.0f} s, "
                  f"{result.reduction['params_removed_fraction']:.2%} of the parameters removed", flush=True)
            prunekit.save(result, checkpoint, overwrite=True)
        for t, path in wanted.items():
            if settings is None:
                model, tokenizer, _ = prunekit.load_model()
                export_gguf(model, tokenizer, path, type=t)
            else:
                export_checkpoint(checkpoint, path, type=t)
            files[(name, t)] = path
    return files


def shapes(path: Path) -> dict[str, Any]:
    """Per-layer widths and sizes read back from the GGUF header."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def values(key: str) -> list[int]:
        field = reader.fields[f"{arch}.{key}"]
        return [int(field.parts[i][0]) for i in field.data]

    n_layer = values("block_count")[0]
    per_layer = {k: (v * n_layer if len(v) == 1 else v) for k, v in
                 (("n_head", values("attention.head_count")), ("n_kv", values("attention.head_count_kv")),
                  ("n_ff", values("feed_forward_length")))}
    return {"hidden": values("embedding_length")[0], "head_dim": values("attention.key_length")[0],
            "vocab": int(reader.fields[f"{arch}.vocab_size"].parts[-1][0]), **per_layer,
            "weight_bytes": int(sum(t.n_bytes for t in reader.tensors))}


def macs_per_token(s: dict[str, Any], context: int) -> int:
    """Multiply-adds of one token at ``context`` cached positions: projections, attention scores and
    values, MLP, and the lm-head (every decoded token needs its logits)."""
    h, hd = s["hidden"], s["head_dim"]
    total = h * s["vocab"]
    for n_head, n_kv, n_ff in zip(s["n_head"], s["n_kv"], s["n_ff"]):
        total += h * hd * (2 * n_head + 2 * n_kv) + 2 * n_head * hd * context + 3 * h * n_ff
    return total


# -- timing ------------------------------------------------------------------------------------------------

def open_model(path: Path, threads: int, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                           n_batch=n_ctx, n_ubatch=n_ctx, verbose=False)


def once(llm, prompt: list[int], decode: list[int]) -> tuple[float, float]:
    """Seconds for one prefill of ``prompt`` and for ``len(decode)`` single-token steps after it."""
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for token in decode:
        llm.eval([token])
    return prefill, time.perf_counter() - started


def time_all(files: dict[tuple[str, str], Path], threads: list[int], prompt_len: int, decode_len: int,
             repeats: int) -> list[dict[str, Any]]:
    """Median prefill/decode tokens/s of every (model, type, threads), interleaved across repetitions."""
    prompt = [(17 * i + 5) % 49000 + 100 for i in range(prompt_len)]
    decode = [(31 * i + 7) % 49000 + 100 for i in range(decode_len)]
    models = {(name, t, n): open_model(path, n, prompt_len + decode_len + 8)
              for (name, t), path in files.items() for n in threads}
    for llm in models.values():  # warm-up: page the weights in, build the graphs
        once(llm, prompt, decode[:4])
    runs: dict[tuple, list[tuple[float, float, float]]] = {key: [] for key in models}
    for _ in range(repeats):
        for key, llm in models.items():
            prefill, dec = once(llm, prompt, decode)
            runs[key].append((prefill, dec, os.getloadavg()[0]))
    for llm in models.values():
        llm.close()
    rows = []
    for (name, t, n), ts in runs.items():
        loads = [r[2] for r in ts]
        rows.append({"model": name, "type": t, "threads": n, "repeats": repeats,
                     "prefill_tokens_per_s": prompt_len / statistics.median(r[0] for r in ts),
                     "decode_tokens_per_s": decode_len / statistics.median(r[1] for r in ts),
                     "load_1m": [round(min(loads), 2), round(statistics.median(loads), 2), round(max(loads), 2)]})
    return rows


# -- instruction counts ------------------------------------------------------------------------------------

CALLGRIND_RUN = """
import sys, llama_cpp
path, n_prompt, n_decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_threads=1, n_threads_batch=1, n_ctx=256, n_batch=256, n_ubatch=256,
                      verbose=False)
llm.eval([(17 * i + 5) % 49000 + 100 for i in range(n_prompt)])
for i in range(n_decode):
    llm.eval([(31 * i + 7) % 49000 + 100])
llm.close()
"""


def instructions(path: Path, n_prompt: int, n_decode: int) -> int:
    """Instructions executed by a process that loads ``path``, prefills and decodes (valgrind callgrind)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c",
                        CALLGRIND_RUN, str(path), str(n_prompt), str(n_decode)],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no instruction total in {out}")
        return int(match.group(1))


def count_all(files: dict[tuple[str, str], Path], prompt_len: int, decode_len: int) -> list[dict[str, Any]]:
    """Instructions per prefilled and per decoded token, by differences of whole runs (load cost cancels)."""
    rows = []
    for (name, t), path in files.items():
        base, prefilled = instructions(path, 1, 0), instructions(path, prompt_len, 0)
        decoded = instructions(path, prompt_len, decode_len)
        rows.append({"model": name, "type": t, "prefill_instructions_per_token": (prefilled - base) / (prompt_len - 1),
                     "decode_instructions_per_token": (decoded - prefilled) / decode_len})
    return rows


# -- report ------------------------------------------------------------------------------------------------

def limits(files: dict[tuple[str, str], Path], context: int) -> list[dict[str, Any]]:
    """Per model and type: multiply-adds per token and weight bytes (what a decode step must read)."""
    rows = []
    for (name, t), path in files.items():
        s = shapes(path)
        rows.append({"model": name, "type": t, "macs_per_token": macs_per_token(s, context),
                     "weight_bytes": s["weight_bytes"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the pruned models and GGUF files live")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="moreau-gs")
    parser.add_argument("--budgets", nargs="+", default=["ratio:0.25", "params:0.25"],
                        help="ratio:R (LLM-Pruner's per-layer ratio; 0.25 removes 15.79 %% of SmolLM2) or params:F")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions (slow: minutes)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--prepare-only", action="store_true", help="make the GGUF files, measure nothing")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = prepare(args.workdir, args.types, args.method, args.budgets)
    if args.prepare_only:
        return 0
    context = args.prompt_len + args.decode_len // 2
    result: dict[str, Any] = {"cpu": _cpu(), "prompt_len": args.prompt_len, "decode_len": args.decode_len,
                              "limits": limits(files, context), "uptime_before": _uptime()}
    result["timings"] = time_all(files, args.threads, args.prompt_len, args.decode_len, args.repeats)
    result["uptime_after"] = _uptime()
    if args.callgrind:
        result["instructions"] = count_all(files, 32, 8)
    print(json.dumps(result, indent=2))
    print("\n".join(table(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def table(result: dict[str, Any]) -> list[str]:
    """Markdown: per type and thread count, tokens/s of every model, pruned/dense, and that speed-up as a share of
    the multiply-add limit (dense MACs per token / the model's)."""
    macs = {(r["model"], r["type"]): r["macs_per_token"] for r in result["limits"]}
    timed = {(r["model"], r["type"], r["threads"]): r for r in result["timings"]}
    out = ["| type | threads | model | MACs limit | prefill tok/s | decode tok/s | prefill × | decode × "
           "| decode, share of limit | load (min/med/max) |", "|" + "---|" * 10]
    for (model, type_, threads), r in timed.items():
        dense = timed.get(("dense", type_, threads))
        limit = macs[("dense", type_)] / macs[(model, type_)]
        if dense is None or model == "dense":
            ratios = "| – | – | – "
        else:
            pre = r["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]
            dec = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
            ratios = f"| {pre:.3f} | {dec:.3f} | {dec / limit:.0%} "
        out.append(f"| {type_} | {threads} | {model} | {limit:.3f}× | {r['prefill_tokens_per_s']:.1f} "
                   f"| {r['decode_tokens_per_s']:.1f} {ratios}| {' / '.join(map(str, r['load_1m']))} |")
    return out


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _cpu() -> str:
    from prunekit.benchmarks.machine import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} logical cores"


if __name__ == "__main__":
    sys.exit(main())
