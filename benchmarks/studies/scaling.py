"""How scoring time and memory grow with model size on this CPU: ``python -m prunekit.benchmarks.studies.scaling --out DIR``.

For random-weight LLaMA-shaped models (SmolLM2-135M, SmolLM2-360M, Llama-3.2-1B shapes) in float32 and
bfloat16, ``taylor`` and ``moreau-gs`` scoring (``prunekit.pipeline.stages.score``, today's code path) each run in a
fresh process (RSS peaks never reset) with one thread. Reported: the RSS peak above the loaded model in
units of the model's own bytes, and the CPU time per calibration token (per proximal step for moreau-gs),
also divided by the parameter count (flat = linear scaling); CPU time, not wall time, because the machine
is shared (wall time is recorded too). Writes ``scaling.json`` and ``scaling.md``
into DIR and prints the markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODULE = "prunekit.benchmarks.studies.scaling"
DEFAULT_SHAPES = ("smollm2-135m", "smollm2-360m", "llama3.2-1b")
# calibration sequences per shape: the per-token figure is what is compared, so big shapes get few
DEFAULT_SAMPLES = {"tiny": 4, "smollm2-135m": 8, "smollm2-360m": 4, "llama3.2-1b": 2}
DTYPES = ("float32", "bfloat16")
METHODS = ("taylor", "moreau-gs")


def method_options(method: str, iterations: int) -> dict[str, Any]:
    """Options for the measurement: moreau-gs runs ``iterations`` steps, all averaged (δ, W' and the running
    mean are all alive from the second step on, so the memory peak is the proximal loop's), with the gradient
    salience, so the time is per proximal step (the preset's Fisher pass after the loop is a fisher pass)."""
    if method.startswith("moreau"):
        return {"iterations": iterations, "averaged": min(2, iterations), "salience": "gradient"}
    return {}


def measure(spec: dict[str, Any], record_path: str) -> dict[str, Any]:
    """In this (fresh) process: build the model, its groups and batches, then score once under a peak-RSS probe."""
    import torch

    torch.set_num_threads(spec["threads"])
    from prunekit import api
    from prunekit.io.load import DTYPES
    from prunekit.benchmarks.studies.isolated import write_json
    from prunekit.benchmarks.memory import PeakRSS
    from prunekit.benchmarks.studies.probes import DtypeProbe
    from prunekit.benchmarks.studies.shapes import build, model_bytes, shape
    from prunekit.data.sampling import RandomTokenSampler

    out: dict[str, Any] = {"spec": spec, "pid": os.getpid(), "loadavg_before": os.getloadavg()[0]}
    s = shape(spec["shape"])
    dtype = DTYPES[spec["dtype"]]
    start = time.perf_counter()
    model = build(s, "cpu", dtype, seed=spec["seed"])
    out["build_seconds"] = round(time.perf_counter() - start, 3)
    groups = api.build_groups(model)
    named = dict(model.named_parameters())
    prunable_params = sum(named[n].numel() for n in dict.fromkeys(sl.param_name for g in groups for sl in g.slices))
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, s.vocab, (spec["n_samples"], spec["seq_len"]), generator=gen)
    batches = list(ids.split(spec["batch_size"]))
    options = method_options(spec["method"], spec["iterations"])
    out.update(params=model.num_parameters(), model_bytes=model_bytes(model), prunable_params=prunable_params,
               groups=len(groups), tokens=ids.numel(), options=options)
    write_json(record_path, out)
    gc.collect()
    with DtypeProbe(model) as probe, PeakRSS() as mem:
        start, cpu_start = time.perf_counter(), time.process_time()
        scores, info = api.score(model, groups, spec["method"], batches, options=options, seed=spec["seed"],
                                 sampler=RandomTokenSampler.like(batches, model.config.vocab_size, spec["seed"]))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    steps = info.get("moreau", {}).get("iterations", 1)
    out.update(
        seconds=round(seconds, 3), cpu_seconds=round(cpu_seconds, 3), steps=steps, scoring=probe.result(),
        rss_before_bytes=mem.baseline, peak_rss_delta_bytes=mem.delta, memory_probe=mem.source,
        peak_over_model=round(mem.delta / out["model_bytes"], 3),
        peak_over_prunable_fp32=round(mem.delta / (4 * prunable_params), 3),
        # CPU time of this process (one torch thread): what the work costs, not how long it waited for a core
        s_per_token_step=cpu_seconds / (out["tokens"] * steps),
        ns_per_token_step_param=1e9 * cpu_seconds / (out["tokens"] * steps * out["params"]),
        scores_finite=bool(all(torch.isfinite(t).all() for t in scores)),
        dtype_after=str(next(model.parameters()).dtype), loadavg_after=os.getloadavg()[0],
        torch_threads=torch.get_num_threads(),
    )
    write_json(record_path, out)
    return out


def mem_available() -> int | None:
    """MemAvailable in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def needed_bytes(shape_name: str, method: str) -> int:
    """What one measurement needs at its peak (today's float32 scoring): the float32 model, 8 (taylor: gradient
    and salience) or 12 (moreau-gs: δ, W', running mean) bytes per prunable weight, and 1.5 GiB for
    activations and the interpreter. Checked against MemAvailable so a shared machine is never pushed into swap
    or the OOM killer."""
    from prunekit.benchmarks.studies.shapes import shape
    from prunekit.core.layers import default_layers

    s = shape(shape_name)
    prunable = len(default_layers(s.layers)) * s.layer_params()
    return 4 * s.n_params() + (12 if method.startswith("moreau") else 8) * prunable + 3 * (1 << 29)


def source_commit() -> dict[str, Any]:
    """The git commit of the prunekit checkout that ran (and whether it had uncommitted changes)."""
    import prunekit

    root = Path(prunekit.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        head, dirty = None, None
    return {"commit": head, "dirty": dirty}


def plan(shapes: list[str], dtypes: list[str], methods: list[str], repeats: int) -> list[tuple[str, str, str]]:
    """Configurations in interleaved order: each repeat walks every shape, alternating dtype and method."""
    return [(s, d, m) for _ in range(repeats) for s in shapes for d in dtypes for m in methods]


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table of measured records (failed ones listed with their error)."""
    head = ("| shape | params | dtype | method | tokens × steps | scoring ran in | wall (s) | CPU (s) | CPU / (token·step) "
            "| ns / (token·step·param) | peak above model (GB) | peak / model bytes |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        sp = r.get("spec", {})
        if "seconds" not in r:
            rows.append(f"| {sp.get('shape')} | | {sp.get('dtype')} | {sp.get('method')} | | | | failed: "
                        f"{str(r.get('error', r.get('skipped', '?'))).splitlines()[0][:80]} | | | | |")
            continue
        ran = "/".join(r["scoring"]["param_dtypes"])
        rows.append(
            f"| {sp['shape']} | {r['params'] / 1e6:.0f} M | {sp['dtype']} | {sp['method']} | {r['tokens']} × "
            f"{r['steps']} | {ran} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['s_per_token_step'] * 1e3:.2f} ms | "
            f"{r['ns_per_token_step_param']:.3f} | {r['peak_rss_delta_bytes'] / 1e9:.2f} | {r['peak_over_model']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration in its own process, write scaling.json / scaling.md and print the table."""
    p = argparse.ArgumentParser(prog="python -m prunekit.benchmarks.studies.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="directory for scaling.json and scaling.md")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--iterations", type=int, default=2, help="moreau-gs proximal steps (default 2, all averaged)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--samples", default="", help="shape=n,... calibration sequences (default: "
                   + ", ".join(f"{k}={v}" for k, v in DEFAULT_SAMPLES.items()) + ")")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        measure(json.loads(args.child), args.record)
        return 0
    if not args.out:
        p.error("--out DIR is required")
    from prunekit.benchmarks.studies.isolated import run_child, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = {**DEFAULT_SAMPLES, **{k: int(v) for k, v in (kv.split("=") for kv in args.samples.split(",") if kv)}}
    shapes = [s for s in args.shapes.split(",") if s]
    result: dict[str, Any] = {"source": source_commit(), "argv": sys.argv[1:], "records": [],
                              "loadavg_start": os.getloadavg()}
    for shape_name, dtype, method in plan(shapes, args.dtypes.split(","), args.methods.split(","), args.repeats):
        spec = {"shape": shape_name, "dtype": dtype, "method": method, "n_samples": samples.get(shape_name, 2),
                "seq_len": args.seq_len, "batch_size": args.batch_size, "iterations": args.iterations,
                "threads": args.threads, "seed": args.seed}
        available = mem_available()
        if available is not None and available < needed_bytes(shape_name, method):
            record = {"spec": spec, "skipped": f"needs ~{needed_bytes(shape_name, method) / 2**30:.1f} GiB, "
                                               f"{available / 2**30:.1f} GiB available"}
        else:
            record = run_child(MODULE, spec, args.timeout)
        result["records"].append(record)
        print(f"{shape_name} {dtype} {method}: " + (f"{record['seconds']:.1f} s, peak/model "
              f"{record['peak_over_model']:.2f}" if "seconds" in record else
              str(record.get("error", record.get("skipped")))[:200]), flush=True)
        write_json(out / "scaling.json", result)
    result["loadavg_end"] = os.getloadavg()
    from prunekit.benchmarks.machine import describe

    result["machine"] = describe()
    write_json(out / "scaling.json", result)
    md = table(result["records"])
    (out / "scaling.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0 if all("seconds" in r for r in result["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())
