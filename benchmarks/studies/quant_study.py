"""Do pruned models lose more to quantization than the dense one? (issue 21, item 4)

For every method x seed, the embedded SmolLM2-135M is pruned as ``prunekit run`` prunes it by default (the
``measured`` allocator, ratio 0.25 in LLM-Pruner's layer range = 15.79 % of the parameters removed,
evaluation off) with MLP widths rounded to 32 (``selection.round_to: 32``, so that q8_0 and q4_0 hold them).
Each pruned model and the dense one is exported to GGUF f16, q8_0 and q4_0 (:mod:`prunekit.io.gguf`) and its
perplexity measured IN LLAMA.CPP (llama-cpp-python, ``logits_all``, ``n_ctx`` = the window, llama.cpp's
default F16 KV cache unless ``--kv-cache f32``) on evenly spaced windows of the PTB and WikiText-2 test
splits, cut as everywhere in prunekit (:func:`prunekit.eval.perplexity.token_windows`: 40 windows of 128 tokens
by default, token ids fed as they are, no BOS, NLL of the 127 predicted tokens per window). The PyTorch
perplexity of the same float32 model on the same windows is the reference beside it. A control,
``dense-shuffled`` (the dense model with its MLP channels permuted, the same function; ``--no-control`` skips
it), measures what regrouping ffn_down's quantization blocks costs without pruning (:func:`shuffled_mlp`).

    python -m prunekit.benchmarks.studies.quant_study [--methods taylor,fisher,moreau-gs] [--seeds 0,1,2]
        [--types f16,q8_0,q4_0] [--windows 40] [--window 128] [--threads 1] [--workdir DIR] [--out FILE]
        [--allocator measured] [--kv-cache f16] [--no-control]
    python -m prunekit.benchmarks.studies.quant_study --summarize [--out FILE] [--windows 40] [--window 128]

One JSON row per (model, seed, type) is appended to ``--out`` (default benchmarks/results/quant/rows.jsonl) as
soon as it is measured, with timings, versions and the load average; a second run skips the rows already
there (the key includes the window length and count). Pruned checkpoints (``prunekit run``'s folders, with
run.json), GGUF files and the PyTorch references are kept in ``--workdir`` (default: prunekit's cache,
studies/quant), so a killed run resumes where it stopped; they are found by name only, so delete the workdir
after changing the pruning or export code. ``--summarize`` prints markdown tables: per corpus,
model and type, the llama.cpp perplexity (mean ± s.d. over seeds), its ratio to the dense model at the same
type, and the quantization penalty ppl(type) / ppl(f16) of the same seed, pruned beside dense.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from prunekit.benchmarks.studies.rows import read_rows

#: (row key, corpus, split) measured per model and type
SETS = (("ptb_test", "ptb", "test"), ("wikitext2_test", "wikitext2", "test"))
METHODS = ("taylor", "fisher", "moreau-gs")
TYPES = ("f16", "q8_0", "q4_0")
DENSE = "dense"
#: The dense model with every layer's MLP channels shuffled (the same function): see :func:`shuffled_mlp`.
CONTROL = "dense-shuffled"
ROUND_TO = 32  # q8_0 and q4_0 pack 32 values per block along each weight row
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quant" / "rows.jsonl"


def say(message: str) -> None:
    """A timestamped progress line, unbuffered."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def default_workdir() -> Path:
    from prunekit.runtime.assets import default_cache_root

    return default_cache_root() / "studies" / "quant"


# ----------------------------------------------------------------------------------------- rows


def row_key(row: dict[str, Any]) -> tuple:
    """What makes a row unique: the model (method, allocator, seed), the GGUF type and the windows."""
    return row["method"], row.get("allocator"), row["seed"], row["type"], row["window"], row["n_windows"]


def model_label(row: dict[str, Any]) -> str:
    """The model's name in the summary: the method, with the allocator when it is not the default."""
    allocator = row.get("allocator")
    return row["method"] if allocator in (None, "measured") else f"{row['method']} ({allocator})"


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One JSON line, flushed to disk before the next measurement starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------- windows and perplexity


def eval_windows(tokenizer: Any, n_windows: int | None, window: int) -> dict[str, torch.Tensor]:
    """Per corpus, its ``n_windows`` evenly spaced non-overlapping windows (prunekit's cut, as ``prunekit eval``)."""
    from prunekit.data.sources import load_text, token_ids
    from prunekit.eval.perplexity import token_windows

    return {key: token_windows(token_ids(tokenizer, load_text(corpus, split)), window, n_windows)
            for key, corpus, split in SETS}


def summarize_nlls(sums: list[float], per_window: int, seconds: float) -> dict[str, Any]:
    """exp(mean NLL) over every predicted token, its standard error from the per-window spread, the per-window NLLs."""
    from prunekit.eval.perplexity import mean_stderr

    nll = sum(sums) / (len(sums) * per_window)
    se = mean_stderr([s / per_window for s in sums])
    return {"ppl": math.exp(nll), "nll": nll, "ppl_stderr": None if se is None else math.exp(nll) * se,
            "n_windows": len(sums), "window_nll_sums": [round(s, 4) for s in sums], "seconds": round(seconds, 2)}


@torch.no_grad()
def torch_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> dict[str, Any]:
    """The PyTorch reference: float32 NLL of the same windows (prunekit.eval.perplexity.window_nlls)."""
    from prunekit.eval.perplexity import window_nlls
    from prunekit.runtime.modelstate import eval_mode

    started, sums = time.perf_counter(), []
    with eval_mode(model):
        for first in range(0, len(windows), batch):
            sums += window_nlls(model, windows[first:first + batch]).tolist()
    return summarize_nlls(sums, windows.shape[1] - 1, time.perf_counter() - started)


def open_llama(path: Path, n_ctx: int, threads: int, kv_cache: str):
    """The GGUF in llama.cpp with the logits of every position kept; F16 KV cache (llama.cpp's default) or F32."""
    import llama_cpp

    kv = {} if kv_cache == "f16" else {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32 = 0
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=True, verbose=False, **kv)


def window_nll_llama(llm: Any, ids: list[int]) -> float:
    """Summed NLL of tokens 1..T-1 of one window given the tokens before it, from llama.cpp's logits (float64)."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


def llama_perplexity(path: Path, windows: dict[str, torch.Tensor], threads: int, kv_cache: str) -> dict[str, Any]:
    """Per corpus, llama.cpp's perplexity of the GGUF on the windows (one model open, every corpus)."""
    from contextlib import closing

    out = {}
    n_ctx = next(iter(windows.values())).shape[1]
    with closing(open_llama(path, n_ctx, threads, kv_cache)) as llm:
        for key, w in windows.items():
            started = time.perf_counter()
            sums = [window_nll_llama(llm, row.tolist()) for row in w]
            out[key] = summarize_nlls(sums, w.shape[1] - 1, time.perf_counter() - started)
    return out


# ----------------------------------------------------------------------------------------- models and files


def prune_checkpoint(workdir: Path, method: str, seed: int, allocator: str) -> tuple[Path, dict, float | None]:
    """``prunekit run --method METHOD --seed SEED --allocator ALLOCATOR --no-eval`` with round_to 32, into
    workdir/pruned/; reused when its run.json is there (the save is all-or-nothing). Returns the folder, its
    run.json and the seconds (None: reused)."""
    from prunekit.core.config import RunConfig
    from prunekit.pipeline.run import run

    folder = workdir / "pruned" / f"{method}-{allocator}-seed{seed}"
    seconds = None
    if not (folder / "run.json").exists():
        config = RunConfig(method=method, seed=seed, output=folder, overwrite=True, allocation={"name": allocator},
                           selection={"round_to": ROUND_TO}, evaluation={"enabled": False})
        say(f"pruning {method} seed {seed} ({config.allocation.name} allocator, ratio {config.ratio})")
        started = time.perf_counter()
        run(config, progress=False)
        seconds = round(time.perf_counter() - started, 1)
    return folder, json.loads((folder / "run.json").read_text()), seconds


def gguf_file(workdir: Path, name: str, type_: str, write: Callable[[Path], Any]) -> tuple[Path, float | None]:
    """workdir/gguf/NAME-TYPE.gguf, written by ``write`` unless it is there (exports are atomic)."""
    path = workdir / "gguf" / f"{name}-{type_}.gguf"
    if path.exists():
        return path, None
    started = time.perf_counter()
    write(path)
    return path, round(time.perf_counter() - started, 2)


def shuffled_mlp(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` whose MLP channels are permuted in every layer (gate/up rows, down columns alike): the
    same function, but ffn_down's 32-value quantization blocks now mix channels from different blocks.

    Why a control: the embedded SmolLM2 was dequantized from a Q4_1 GGUF, so its weights sit on Q4_1's grid, one
    scale and minimum per 32 values along each row. Pruning removes MLP channels, i.e. ffn_down columns, and
    regroups the kept ones into new blocks that straddle the old ones; q/k/v/gate/up lose rows (blocks intact)
    and attn_output loses whole heads of 64 (blocks intact). Part of a pruned model's extra Q4_0 penalty may be
    that regrouping rather than pruning; a full shuffle regroups more than pruning does (pruning keeps the channel
    order, so a new block straddles few old ones), measured without pruning anything. Not a strict bound.
    """
    import copy

    shuffled = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in shuffled.model.layers:
            mlp = layer.mlp
            perm = torch.randperm(mlp.gate_proj.out_features, generator=g)
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    return shuffled


def tensor_type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each type the GGUF holds (the output matrix is Q8_0 in a q4_0 file)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def torch_reference(workdir: Path, name: str, model: torch.nn.Module, windows: dict[str, torch.Tensor]) -> dict:
    """The PyTorch perplexities of ``model`` on the windows, kept in workdir/torch/ so a resumed run reuses them."""
    n, w = len(next(iter(windows.values()))), next(iter(windows.values())).shape[1]
    path = workdir / "torch" / f"{name}-w{w}-n{n}.json"
    if path.exists():
        return json.loads(path.read_text())
    say(f"{name}: PyTorch perplexity")
    result = {key: torch_perplexity(model, ws) for key, ws in windows.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether it had uncommitted changes (the results folder, which this study writes
    into, not counted)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"]
        dirty = bool(subprocess.run(status, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def environment(threads: int, kv_cache: str) -> dict[str, Any]:
    """Machine, package versions (llama-cpp-python and gguf included) and the llama.cpp settings."""
    from importlib import metadata

    from prunekit.benchmarks.machine import describe

    machine = describe()
    versions = machine.pop("versions")
    machine.pop("loadavg_1m")  # each row has its own, at its start and end
    for dist in ("llama_cpp_python", "gguf", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"machine": machine, "versions": versions, "git": git_state(),
            "llama_cpp": {"n_threads": threads, "kv_cache": kv_cache, "logits_all": True}}


# ----------------------------------------------------------------------------------------- the study


def measure_model(name: str, allocator: str | None, seed: int | None, types: list[str], model_info: dict[str, Any],
                  model, windows, args, env, done: set, export_model: Callable[[Path, str], Any]) -> int:
    """Every missing (type) row of one model: export, llama.cpp perplexity, append. Returns rows written."""
    n_windows, window = len(next(iter(windows.values()))), next(iter(windows.values())).shape[1]
    label = name if seed is None else f"{name}-{allocator}-seed{seed}"
    reference = torch_reference(args.workdir, label, model, windows)
    written = 0
    for type_ in types:
        if (name, allocator, seed, type_, window, n_windows) in done:
            continue
        load_start = os.getloadavg()
        path, export_s = gguf_file(args.workdir, label, type_, lambda p, t=type_: export_model(p, t))
        say(f"{label} {type_}: llama.cpp perplexity ({n_windows} windows x {len(windows)} corpora)")
        measured = llama_perplexity(path, windows, args.threads, args.kv_cache)
        row = {"study": "quant", "method": name, "allocator": allocator, "seed": seed, "type": type_, "window": window,
               "n_windows": n_windows, **model_info,
               "gguf_bytes": path.stat().st_size, "gguf_tensor_types": tensor_type_counts(path)}
        for key in windows:
            row[key] = {"llama": measured[key], "torch": reference[key],
                        "llama_over_torch": measured[key]["ppl"] / reference[key]["ppl"]}
        row["timings_s"] = {"prune": model_info.get("prune_s"), "export": export_s,
                            **{f"llama_{key}": measured[key]["seconds"] for key in windows},
                            **{f"torch_{key}": reference[key]["seconds"] for key in windows}}
        row["loadavg"] = {"start": [round(x, 2) for x in load_start],
                          "end": [round(x, 2) for x in os.getloadavg()]}
        row.update(env, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        row.pop("prune_s", None)
        append_row(args.out, row)
        done.add(row_key(row))
        written += 1
        say(f"{label} {type_}: " + ", ".join(f"{k} {row[k]['llama']['ppl']:.2f} (torch {row[k]['torch']['ppl']:.2f})"
                                              for k in windows))
    return written


def run_study(args: argparse.Namespace) -> int:
    import prunekit
    from prunekit.io.gguf import export_checkpoint, export_gguf

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    done = {row_key(r) for r in read_rows(args.out)}
    dense, tokenizer, source = prunekit.load_model()
    windows = eval_windows(tokenizer, args.windows, args.window)
    env = environment(args.threads, args.kv_cache)
    n_windows = len(next(iter(windows.values())))

    def missing(name: str, allocator: str | None, seed: int | None) -> list[str]:
        return [t for t in args.types if (name, allocator, seed, t, args.window, n_windows) not in done]

    written = 0
    if missing(DENSE, None, None):
        info = {"model_source": source, "params_removed_fraction": 0.0,
                "n_params": sum(p.numel() for p in dense.parameters()),
                "mlp_widths": [layer.mlp.gate_proj.out_features for layer in dense.model.layers]}
        written += measure_model(DENSE, None, None, missing(DENSE, None, None), info, dense, windows, args, env, done,
                                 lambda path, t: export_gguf(dense, tokenizer, path, type=t))
    if args.control and missing(CONTROL, None, None):
        control = shuffled_mlp(dense)
        info = {"model_source": f"{source}, MLP channels shuffled (torch.randperm, generator seed 0)",
                "params_removed_fraction": 0.0, "n_params": sum(p.numel() for p in control.parameters()),
                "mlp_widths": [layer.mlp.gate_proj.out_features for layer in control.model.layers]}
        written += measure_model(CONTROL, None, None, missing(CONTROL, None, None), info, control, windows, args, env,
                                 done, lambda path, t: export_gguf(control, tokenizer, path, type=t))
        del control
    for method in args.methods:
        for seed in args.seeds:
            types = missing(method, args.allocator, seed)
            if not types:
                say(f"{method} seed {seed}: every row is there")
                continue
            folder, manifest, prune_s = prune_checkpoint(args.workdir, method, seed, args.allocator)
            model = prunekit.load_pruned(folder, dtype=torch.float32)
            info = {"model_source": str(folder), "prune_s": prune_s if prune_s is not None
                    else round(sum(manifest.get("timings", {}).values()), 1),
                    "pruned_now": prune_s is not None,
                    "params_removed_fraction": manifest["reduction"]["params_removed_fraction"],
                    "n_params": manifest["reduction"]["params_after"],
                    "mlp_widths": [s["intermediate_size"] for s in manifest["layer_shapes"]],
                    "layer_shapes": manifest["layer_shapes"],
                    "allocation": {k: v for k, v in manifest["allocation"].items()
                                   if k in ("allocator", "options", "budget", "cache", "gap_fraction")},
                    "run_config": {k: manifest["config"][k] for k in ("method", "ratio", "seed", "selection")}}
            written += measure_model(method, args.allocator, seed, types, info, model, windows, args, env, done,
                                     lambda path, t, f=folder: export_checkpoint(f, path, type=t))
            del model
    say(f"{written} rows written to {args.out}")
    return 0


# ----------------------------------------------------------------------------------------- summary


def mean_sd(values: list[float], digits: int = 2) -> str:
    """``mean ± s.d.`` over seeds (sample s.d.), or the one value."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_tables(rows: list[dict[str, Any]], window: int, n_windows: int) -> list[str]:
    """Markdown tables, one per corpus: llama.cpp perplexity, ratio to dense at the same type, and the quantization
    penalty ppl(type)/ppl(f16) (per seed, then averaged) beside the dense model's own penalty."""
    rows = [r for r in rows if r["window"] == window and r["n_windows"] == n_windows]
    if not rows:
        return [f"no rows with {n_windows} windows of {window} tokens"]
    ppl = {(model_label(r), r["seed"], r["type"]): r for r in rows}
    models = list(dict.fromkeys([DENSE, CONTROL] + [model_label(r) for r in rows if r["method"] != DENSE]))
    types = [t for t in TYPES if any(r["type"] == t for r in rows)] + sorted(
        {r["type"] for r in rows} - set(TYPES))
    corpora = [key for key, _, _ in SETS if any(key in r for r in rows)]
    loads = [x for r in rows for x in (r["loadavg"]["start"][0], r["loadavg"]["end"][0])]
    out = [f"{len(rows)} rows, {n_windows} evenly spaced windows of {window} tokens per corpus; perplexity in "
           f"llama.cpp (KV cache {sorted({r['llama_cpp']['kv_cache'] for r in rows})}); mean ± s.d. over seeds; "
           f"load average (1 min) {min(loads):.1f}–{max(loads):.1f}.", ""]
    for corpus in corpora:
        def value(model: str, seed: int | None, type_: str) -> float | None:
            row = ppl.get((model, seed, type_))
            return None if row is None or corpus not in row else row[corpus]["llama"]["ppl"]

        out += [f"### {corpus}", "",
                "| model | type | seeds | llama.cpp ppl | PyTorch ppl | llama.cpp / PyTorch | ratio to dense "
                "(same type) | penalty ppl(type)/ppl(f16) | penalty / dense penalty |",
                "|---|---|---|---|---|---|---|---|---|"]
        for model in models:
            seeds = sorted({r["seed"] for r in rows if model_label(r) == model}, key=lambda s: -1 if s is None else s)
            for type_ in types:
                have = [s for s in seeds if value(model, s, type_) is not None]
                if not have:
                    continue
                vals = [value(model, s, type_) for s in have]
                torch_vals = [ppl[(model, s, type_)][corpus]["torch"]["ppl"] for s in have]
                own = [v / t for v, t in zip(vals, torch_vals)]
                dense_same = value(DENSE, None, type_)
                ratio = [v / dense_same for v in vals] if dense_same else []
                paired = [(value(model, s, type_), value(model, s, "f16")) for s in have]
                penalty = [q / f for q, f in paired if f]
                dense_f16 = value(DENSE, None, "f16")
                dense_penalty = dense_same / dense_f16 if dense_same and dense_f16 else None
                relative = [p / dense_penalty for p in penalty] if dense_penalty else []
                out.append(f"| {model} | {type_} | {'–' if model in (DENSE, CONTROL) else len(have)} | {mean_sd(vals)} "
                           f"| {mean_sd(torch_vals)} | {mean_sd(own, 3)} | {mean_sd(ratio, 3)} | {mean_sd(penalty, 3)} "
                           f"| {mean_sd(relative, 3)} |")
        out.append("")
    out += ["ratio to dense: pruned ppl / dense ppl, both in llama.cpp at the same type. penalty: ppl(type) / "
            "ppl(f16) of the same model and seed; penalty / dense penalty > 1: the pruned model loses more to "
            "that quantization than the dense one. llama.cpp / PyTorch: the export's own fidelity (about 1 for f16). "
            f"{CONTROL}: the dense model with its MLP channels shuffled, the same function; its penalty over dense's "
            "is what regrouping ffn_down's quantization blocks costs by itself (the embedded model's weights come "
            "from a Q4_1 file); a full shuffle regroups more than pruning, which keeps the channel order."]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default %(default)s)")
    parser.add_argument("--types", default=",".join(TYPES), help="GGUF types (default %(default)s)")
    parser.add_argument("--windows", type=int, default=40, help="evenly spaced windows per corpus (default 40)")
    parser.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--allocator", default="measured",
                        help="prunekit run's allocator (default measured, prunekit run's own; uniform: no probe, "
                             "for a quick smoke run)")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help=f"skip the {CONTROL} control (the dense model, MLP channels shuffled; see shuffled_mlp)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp and torch threads (default 1)")
    parser.add_argument("--kv-cache", choices=["f16", "f32"], default="f16",
                        help="llama.cpp KV cache type (default f16, llama.cpp's own default)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="pruned checkpoints, GGUF files, PyTorch references (default: prunekit's cache, "
                             "studies/quant)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="rows file (default %(default)s)")
    parser.add_argument("--summarize", action="store_true", help="print the markdown summary of --out and exit")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.types = [t for t in args.types.split(",") if t]
    args.workdir = (args.workdir or default_workdir()).expanduser()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print("\n".join(summary_tables(read_rows(args.out), args.window, args.windows)))
        return 0
    return run_study(args)


if __name__ == "__main__":
    raise SystemExit(main())
