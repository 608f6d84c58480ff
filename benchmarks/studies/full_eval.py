"""Full-test-set quality driver for issues 13 and 14: every grid cell, 3 seeds, FULL PTB test, WikiText-2 test
and PTB validation, on a GPU shared by several worker processes.

``python -m prunekit.benchmarks.studies.full_eval --device cuda --workers N --seeds 0,1,2 --out DIR
[--grid issue13,issue14 | --grid-file F] [--cells PATTERN,..] [--windows all|N] [--time-budget-s S]``
``python -m prunekit.benchmarks.studies.full_eval --report DIR`` renders summary.md + plots from a finished DIR.

Each cell (:mod:`prunekit.benchmarks.studies.full_grid`) is a :class:`prunekit.core.config.RunConfig` without a seed and
goes through the stages of ``prunekit.pipeline.prune.prune_with_config`` one by one (groups, calibrate, score through
``stability.score``, allocate + select through ``allocate_select``, ``api.apply``), so scores are computed
once per (method, options, calibration, seed, groups) and shared by every allocator and budget that uses
them (a score cache shared by the workers: --scores-dir, by default a temporary folder). Perplexity: every non-overlapping 128-token window of the tokenized split
(prunekit's convention, ``prunekit.eval.perplexity.perplexity``; exp of the mean NLL of the 127 predicted tokens
per window, no window straddles another), batched on the device. Each finished (cell, seed) is appended
to DIR/rows.jsonl at once and DIR/summary.{json,md} are rewritten, so a killed run keeps its results; a
second run on the same DIR skips the (cell, seed) pairs already there.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import json
import math
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from prunekit.pipeline.plan import plan
from prunekit.benchmarks.studies import full_grid

# Everything a run writes into DIR: few flat files, so a results folder travels whole (e.g. back from a
# borrowed GPU machine that returns at most 8 files); the score cache lives elsewhere (--scores-dir).
ROWS, MASKS, RUN, SUMMARY_JSON, SUMMARY_MD = "rows.jsonl", "masks.jsonl", "run.json", "summary.json", "summary.md"
SETS = (("ptb_validation", "ptb", "validation"), ("ptb_test", "ptb", "test"), ("wikitext2_test", "wikitext2", "test"))
WINDOW = 128


def say(message: str) -> None:
    """A timestamped progress line, unbuffered."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# ----------------------------------------------------------------------------------------- evaluation


def eval_windows(tokenizer: Any, n_windows: int | None) -> dict[str, torch.Tensor]:
    """Per evaluation set, its non-overlapping 128-token windows: all of them, or ``n_windows`` evenly spaced
    (the same choice as ``prunekit.eval.perplexity.perplexity(max_windows=)``)."""
    from prunekit.data.sources import load_text, token_ids
    from prunekit.eval.perplexity import token_windows

    return {key: token_windows(token_ids(tokenizer, load_text(corpus, split)), WINDOW, n_windows)
            for key, corpus, split in SETS}


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> dict[str, float]:
    """exp(mean NLL) over every predicted token of the windows, and its standard error (per-window spread)."""
    from prunekit.eval.perplexity import mean_stderr, window_nlls
    from prunekit.runtime.modelstate import eval_mode

    sums: list[float] = []
    with eval_mode(model):
        for first in range(0, len(windows), batch):
            sums += window_nlls(model, windows[first:first + batch]).tolist()
    per_window = windows.shape[1] - 1
    nll = sum(sums) / (len(sums) * per_window)
    se = mean_stderr([s / per_window for s in sums])
    return {"ppl": math.exp(nll), "nll": nll, "ppl_stderr": None if se is None else math.exp(nll) * se,
            "n_windows": len(sums)}


# ----------------------------------------------------------------------------------------- one worker


def score_key(config) -> str:
    """What the scores depend on: method, options, calibration, seed, stability and the group set."""
    layers = config.selection.layers, config.allocation.layers  # what prunekit.allocation.plan.pruned_layers reads
    payload = {"method": config.method, "options": config.method_options,
               "calibration": config.calibration.model_dump(mode="json"), "seed": config.seed,
               "stability": config.stability, "grouper": config.grouper.model_dump(mode="json"),
               "layers": [list(layers[0]) if layers[0] else None, layers[1]]}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Worker:
    """One loaded dense model on the device; runs tasks (cells sharing one score key) and reports rows."""

    def __init__(self, args: dict, emit):
        from prunekit import api
        from prunekit.plugin.registry import get_registry

        self.args, self.emit = args, emit
        self.device = torch.device(args["device"])
        started = time.perf_counter()
        self.model, self.tokenizer, self.source = api.load_model(args["model"], "float32", args["device"])
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.registry = get_registry()
        self.load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        self.windows = eval_windows(self.tokenizer, args["windows"])
        api.calibrate(self.tokenizer, n_samples=1, seq_len=2, seed=0)  # tokenize PTB train now, not in a timed cell
        self.tokenize_seconds = time.perf_counter() - started
        self.scores_dir = Path(args["scores_dir"])

    def sync(self) -> None:
        """Wait for queued device work so a timer measures it (no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate(self, model: torch.nn.Module) -> tuple[dict, float]:
        self.sync()
        started = time.perf_counter()
        result = {key: perplexity(model, w, self.args["eval_batch"]) for key, w in self.windows.items()}
        self.sync()
        return result, time.perf_counter() - started

    def dense(self) -> dict:
        metrics, seconds = self.evaluate(self.model)
        return {"kind": "dense", "params": self.model.num_parameters(), "eval": metrics,
                "timings": {"load": self.load_seconds, "tokenize": self.tokenize_seconds, "evaluate": seconds}}

    def scores(self, ctx, plan, config) -> tuple[list[torch.Tensor], dict, dict]:
        """Scores of the context's groups for ``config``: from the score cache when another task made them, else
        computed (calibrate + ``stability.score``, the pipeline's scoring stage) and stored."""
        import prunekit.pipeline.stability as stability
        from prunekit import api

        path = self.scores_dir / f"{score_key(config)}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)
            return saved["scores"], saved["info"], {**saved["timings"], "scores_cached": True}
        timings: dict[str, Any] = {}
        batches, calibration = [], None
        started = time.perf_counter()
        if plan.method.needs_calibration(plan.options):
            batches, calibration = api.calibrate(self.tokenizer, config.calibration, seed=config.calibration_seed)
        timings["calibrate"] = time.perf_counter() - started
        self.sync()
        started = time.perf_counter()
        scores, info = stability.score(ctx, plan.method, plan.options, batches)
        self.sync()
        timings["score"] = time.perf_counter() - started
        info = _brief(info)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"scores": scores, "info": info, "timings": timings, "calibration": calibration}, tmp)
        os.replace(tmp, path)
        return scores, info, {**timings, "scores_cached": False}

    def task(self, cells: list[dict], seed: int, deadline: float | None) -> None:
        """Run the cells of one task (one score key) at one seed; one row per cell, emitted at once."""
        from prunekit import api
        from prunekit.allocation.plan import pruned_layers
        from prunekit.pipeline.context import RunContext

        first = full_grid.run_config(cells[0], seed, self.args["device"])
        run_plan = plan(first, self.registry)
        ctx = RunContext(config=first, registry=self.registry, model=self.model, tokenizer=self.tokenizer,
                         adapter=self.registry.adapter_for(self.model))
        started = time.perf_counter()
        layers = pruned_layers(first, ctx.adapter.num_layers)
        ctx.groups = api.build_groups(self.model, layers, run_plan.grouper, self.registry)
        groups_seconds = time.perf_counter() - started
        scores, info, score_timings = self.scores(ctx, run_plan, first)
        for i, cell in enumerate(cells):
            if i and deadline is not None and time.time() > deadline:
                self.emit("log", f"deadline: {cell['id']} seed {seed} not run")
                continue
            try:
                self.cell(ctx, cell, seed, scores, info, {"groups": groups_seconds, **score_timings})
            except Exception as exc:  # record it; the task's other cells still run
                self.emit("row", {"kind": "error", "task": f"{cell['id']} seed {seed}", "cells": [cell["id"]],
                                  "seed": seed, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-4000:]})

    def cell(self, ctx, cell: dict, seed: int, scores: list[torch.Tensor], info: dict, timings: dict) -> None:
        """Allocate + select from the shared scores, prune a copy, evaluate it, emit the row."""
        from prunekit import api
        from prunekit.allocation.plan import allocate_select

        config = full_grid.run_config(cell, seed, self.args["device"])
        ctx.config = config
        self.sync()
        started = time.perf_counter()
        kept, allocation = allocate_select(ctx, scores)
        self.sync()
        allocate_seconds = time.perf_counter() - started
        started = time.perf_counter()
        pruned = copy.deepcopy(self.model)
        api.apply(pruned, ctx.groups, kept, self.registry)
        self.sync()
        apply_seconds = time.perf_counter() - started
        metrics, eval_seconds = self.evaluate(pruned)
        params = pruned.num_parameters()
        del pruned
        removed = {g.name: sorted(set(range(g.n_units)) - set(k.tolist())) for g, k in zip(ctx.groups, kept)}
        self.emit("mask", {"cell": cell["id"], "seed": seed, "removed": removed})
        self.emit("row", {
            "kind": "cell", "cell": cell["id"], "seed": seed, "issue": cell.get("issue"), "label": cell.get("label"),
            "method": config.method, "allocator": cell.get("allocator"), "budget": cell.get("budget"),
            "tier": cell.get("tier"), "config": cell["config"], "params": params,
            "params_removed_fraction": 1 - params / self.model.num_parameters(),
            "allocation": {k: v for k, v in allocation.items() if k not in ("counts", "measured")},
            "counts": allocation.get("counts"), "eval": metrics, "score_info": info,
            "mask": MASKS,
            "timings": {**timings, "allocate_select": allocate_seconds,
                        "apply": apply_seconds, "evaluate": eval_seconds}})


def _brief(info: dict) -> dict:
    """The method info without per-window offsets (JSON-friendly)."""
    out = json.loads(json.dumps(info, default=str))
    for draw in out.get("calibration_draws", []) or []:
        if isinstance(draw, dict):
            draw.pop("starts", None)
    return out


def setup_torch(threads: int, allow_tf32: bool = False) -> None:
    """Float32 numbers comparable to CPU (no TF32 unless asked), ``threads`` CPU threads."""
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")


def worker_main(wid: int, args: dict, tasks, results) -> None:
    """A spawned worker: load the model, then take tasks until the queue says stop or the deadline passed."""
    def emit(kind: str, payload: Any) -> None:
        results.put((kind, wid, payload))

    try:
        setup_torch(args["threads"], args["allow_tf32"])
        worker = Worker(args, emit)
        emit("log", f"ready: load {worker.load_seconds:.1f}s, tokenize {worker.tokenize_seconds:.1f}s, "
                    f"windows { {k: len(v) for k, v in worker.windows.items()} }")
        while True:
            item = tasks.get()
            if item is None:
                break
            if args["deadline"] is not None and time.time() > args["deadline"]:
                emit("log", f"deadline: task {item['name']} not started")
                continue
            try:
                if item["kind"] == "dense":
                    emit("row", worker.dense())
                else:
                    worker.task(item["cells"], item["seed"], args["deadline"])
            except Exception as exc:  # one failing cell must not sink the grid: record it and go on
                emit("row", {"kind": "error", "task": item["name"], "cells": [c["id"] for c in item.get("cells", [])],
                             "seed": item.get("seed"), "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-4000:]})
    except Exception as exc:
        emit("log", f"worker failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}")
    finally:
        emit("exit", None)


# ----------------------------------------------------------------------------------------- scheduling


def plan_tasks(cells: list[dict], seeds: list[int], done: set[tuple[str, int]], dense_done: bool,
               device: str) -> list[dict]:
    """Tasks in priority order: the dense row, then per tier and seed the cells grouped by score key."""
    tasks: list[dict] = [] if dense_done else [{"kind": "dense", "name": "dense"}]
    for tier in sorted({c["tier"] for c in cells}):
        for seed in seeds:
            by_key: dict[str, list[dict]] = {}
            for cell in (c for c in cells if c["tier"] == tier and (c["id"], seed) not in done):
                by_key.setdefault(score_key(full_grid.run_config(cell, seed, device)), []).append(cell)
            for key, group in by_key.items():
                tasks.append({"kind": "cells", "name": f"{group[0]['id']} (+{len(group) - 1}) seed {seed}",
                              "cells": group, "seed": seed, "key": key})
    return tasks


def read_rows(out: Path, name: str = ROWS) -> list[dict]:
    """The JSON lines of DIR/name (a line cut by a kill is skipped)."""
    from prunekit.benchmarks.studies.rows import read_rows as read_jsonl

    return read_jsonl(out / name)


def validate(cells: list[dict], device: str) -> None:
    """Every cell's config and plan (method, options, grouper, allocator) checked before any model loads."""
    from prunekit import api
    from prunekit.errors import UserError
    from prunekit.plugin.registry import get_registry

    registry = get_registry()
    for cell in cells:
        try:
            plan(full_grid.run_config(cell, 0, device), registry)
        except UserError as exc:
            raise UserError(f"cell {cell['id']}: {exc}" if not str(exc).startswith("cell ") else str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Plan, spawn the workers, collect rows into DIR/rows.jsonl, keep DIR/summary.* current."""
    from prunekit.benchmarks.studies import full_report
    from prunekit.errors import UserError

    started = time.time()
    out: Path = args.out
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda requested but no CUDA device is available (accepted: cpu, cuda)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {str(out)!r} exists and is not a folder")
    cells = full_grid.cells([g.strip() for g in args.grid.split(",") if g.strip()], args.grid_file)
    if args.cells:
        patterns = [p.strip() for p in args.cells.split(",") if p.strip()]
        cells = [c for c in cells if any(fnmatch.fnmatch(c["id"], p) for p in patterns)]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not cells:
        raise UserError(f"--cells: {args.cells!r} matches no cell of the grid")
    validate(cells, args.device)  # every config and plan checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    previous = read_rows(out)
    done = {(r["cell"], r["seed"]) for r in previous if r.get("kind") == "cell"}
    dense_done = any(r.get("kind") == "dense" for r in previous)
    tasks = plan_tasks(cells, seeds, done, dense_done, args.device)
    deadline = started + args.time_budget_s if args.time_budget_s else None
    workers = args.workers
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    scores_dir = args.scores_dir or Path(tempfile.mkdtemp(prefix="full_eval_scores_"))
    settings = {"device": args.device, "model": args.model, "windows": args.windows, "eval_batch": args.eval_batch,
                "threads": threads, "deadline": deadline, "scores_dir": str(scores_dir), "allow_tf32": args.allow_tf32}
    say(f"{len(cells)} cells x {len(seeds)} seeds: {len(tasks)} tasks ({len(done)} (cell, seed) already in "
        f"{out / 'rows.jsonl'}); {workers} workers x {threads} threads on {args.device}; "
        f"budget {args.time_budget_s or 'none'} s")
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv, "workers": workers, "threads": threads,
            "device": args.device, "windows": args.windows, "eval_batch": args.eval_batch, "seeds": seeds,
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": os.getloadavg(), "time_budget_s": args.time_budget_s, "allow_tf32": args.allow_tf32}
    (out / RUN).write_text(json.dumps({"cells": cells, "seeds": seeds, "meta": meta}, indent=1, default=str))
    try:
        finished = _collect(out, tasks, workers, settings, meta, deadline, args.grace_s, started) if tasks else 0
    finally:
        if args.scores_dir is None:
            shutil.rmtree(scores_dir, ignore_errors=True)
    if not tasks:
        say(f"nothing to do: every (cell, seed) pair is already in {ROWS}")
    meta.update(elapsed_s=round(time.time() - started, 1), loadavg_end=os.getloadavg(), rows_this_run=finished)
    try:
        summary = full_report.write_summary(out, meta, with_plots=args.plots)
    except Exception as exc:  # plots are renderable later with --report; the rows are what matters
        say(f"plots failed ({type(exc).__name__}: {exc}); summary without plots")
        summary = full_report.write_summary(out, meta)
    say(f"done: {finished} rows in {meta['elapsed_s']} s; {summary['complete']} of {summary['expected']} "
        f"(cell, seed) pairs; summary in {out / SUMMARY_MD}")
    return 0 if not summary["errors"] else 1


def _collect(out: Path, tasks: list[dict], workers: int, settings: dict, meta: dict, deadline: float | None,
             grace: float, started: float) -> int:
    """Spawn the workers, append their rows and masks as they come, keep the summary current; rows written."""
    import multiprocessing as mp

    from prunekit.benchmarks.studies import full_report

    ctx = mp.get_context("spawn")
    task_q, result_q = ctx.Queue(), ctx.Queue()
    for t in tasks:
        task_q.put(t)
    for _ in range(workers):
        task_q.put(None)
    procs = [ctx.Process(target=worker_main, args=(i, settings, task_q, result_q), daemon=True) for i in range(workers)]
    for p in procs:
        p.start()
    alive, finished = workers, 0
    with (out / ROWS).open("a") as rows_file, (out / MASKS).open("a") as masks_file:
        while alive:
            if deadline is not None and time.time() > deadline + grace:
                say(f"budget + {grace} s grace spent: stopping {alive} worker(s) mid-task")
                break
            try:
                kind, wid, payload = result_q.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if kind == "exit":
                alive -= 1
            elif kind == "log":
                say(f"[w{wid}] {payload}")
            elif kind == "mask":
                masks_file.write(json.dumps(payload) + "\n")
                masks_file.flush()
            elif kind == "row":
                payload.update(worker=wid, finished_at=round(time.time() - started, 1))
                rows_file.write(json.dumps(payload, default=str) + "\n")
                rows_file.flush()
                finished += 1
                say(f"[w{wid}] {_row_line(payload)}")
                meta["elapsed_s"] = round(time.time() - started, 1)
                full_report.write_summary(out, meta)
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join(timeout=10)
    return finished


def _row_line(row: dict) -> str:
    if row.get("kind") == "error":
        return f"ERROR {row['task']}: {row['error']}"
    ppl = " ".join(f"{k} {v['ppl']:.2f}" for k, v in row["eval"].items())
    t = row["timings"]
    if row.get("kind") == "dense":
        return f"dense: {ppl} (eval {t['evaluate']:.1f}s)"
    return (f"{row['cell']} seed {row['seed']}: removed {100 * row['params_removed_fraction']:.2f} %, {ppl}; "
            f"score {t.get('score', 0):.1f}s{' (cached)' if t.get('scores_cached') else ''}, "
            f"allocate {t['allocate_select']:.1f}s, apply {t['apply']:.1f}s, eval {t['evaluate']:.1f}s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m prunekit.benchmarks.studies.full_eval", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help=f"results folder ({RUN}, {ROWS}, {MASKS}, {SUMMARY_JSON}, {SUMMARY_MD})")
    ap.add_argument("--scores-dir", type=Path, default=None,
                    help="keep the score cache here (default: a temporary folder, removed at the end)")
    ap.add_argument("--plots", action="store_true", help="also render the PNG plots at the end (else: --report DIR)")
    ap.add_argument("--report", type=Path, help="only render summary.md and plots from a finished results folder")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default=None, help="local model folder; default the embedded SmolLM2-135M")
    ap.add_argument("--workers", type=int, default=1, help="worker processes sharing the device (spawned)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: cores / workers)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--grid", default="issue13,issue14", help=f"comma-separated: {', '.join(full_grid.GRIDS)}")
    ap.add_argument("--grid-file", type=Path, default=None, help="JSON/YAML list of cells instead of --grid")
    ap.add_argument("--cells", default="", help="only cells whose id matches one of these comma-separated globs")
    ap.add_argument("--windows", default="all", help="'all' (full sets) or N evenly spaced windows per set")
    ap.add_argument("--eval-batch", type=int, default=0, help="windows per forward pass (0: 64 on cuda, 8 on cpu)")
    ap.add_argument("--time-budget-s", type=float, default=0, help="stop taking new tasks after this many seconds")
    ap.add_argument("--allow-tf32", action="store_true",
                    help="TF32 matmuls on CUDA (~several x faster, numbers no longer comparable to CPU float32)")
    ap.add_argument("--grace-s", type=float, default=60, help="after the budget, wait this long for running tasks")
    args = ap.parse_args(argv)
    if args.report is None and args.out is None:
        ap.error("--out (or --report DIR) is required")
    if args.windows == "all":
        args.windows = None
    else:
        try:
            args.windows = int(args.windows)
            assert args.windows >= 1
        except (ValueError, AssertionError):
            ap.error(f"--windows: {args.windows!r} is not 'all' or a positive integer")
    if not args.eval_batch:
        args.eval_batch = 64 if args.device == "cuda" else 8
    if args.workers < 1:
        ap.error(f"--workers: {args.workers} (accepted: an integer >= 1)")
    if args.eval_batch < 1 or args.threads < 0:
        ap.error("--eval-batch must be >= 1 and --threads >= 0")
    if args.time_budget_s < 0 or args.grace_s < 0:
        ap.error("--time-budget-s and --grace-s must be >= 0")
    try:
        [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: {args.seeds!r} (accepted: comma-separated integers, e.g. 0,1,2)")
    return args


def main(argv: list[str] | None = None) -> int:
    from prunekit.errors import UserError

    args = parse_args(argv)
    try:
        if args.report is not None:
            from prunekit.benchmarks.studies import full_report

            summary = full_report.render(args.report)
            say(f"report: {args.report / 'summary.md'} ({summary['complete']} of {summary['expected']} pairs)")
            return 0
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
