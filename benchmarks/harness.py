"""Command line of the benchmarks: run suites for methods on one model and write JSON, markdown and plots.

``python -m prunekit.benchmarks --suite robustness --methods magnitude,taylor --ratio 0.25 --seeds 0,1,2 --out DIR``
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

import prunekit.runtime.atomic as atomic
from prunekit.benchmarks import cost, peer, quality, report, robustness, sweep
from prunekit.benchmarks.machine import describe as describe_machine
from prunekit.benchmarks.perturb import PERTURBATIONS
from prunekit.benchmarks.profiles import PROFILES, Profile
from prunekit.benchmarks.workbench import Workbench
from prunekit.errors import UserError

SUITES = ("robustness", "cost", "quality", "peer")
DEFAULT_METHODS = ("magnitude", "taylor", "fisher", "moreau", "moreau-gs")
log = logging.getLogger("benchmarks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The harness's options."""
    ap = argparse.ArgumentParser(prog="benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=(*SUITES, "sweep", "all", "report"), default="all",
                    help="'report' only rebuilds the markdown and plots from the JSON files in --out; "
                         "'sweep' (not part of 'all') is the quality-per-cost grid (docs/benchmarks.md)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method names")
    ap.add_argument("--model", default=None, help="local path or hub id; default: the embedded SmolLM2-135M")
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of units removed per pruned layer")
    ap.add_argument("--ratios", help="comma-separated ratios of the quality sweep (default: the profile's)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (calibration sample, noise, method)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 is much faster than oversubscribed cores on a busy machine)")
    ap.add_argument("--ppl-windows", type=int, default=None, help="override the profile's perplexity window cap")
    ap.add_argument("--calib-batch", type=int, default=None,
                    help="calibration micro-batch size (default: the pipeline's calibration.batch_size)")
    ap.add_argument("--speed-repeats", type=int, default=None, help="cost: interleaved throughput repeats (median)")
    ap.add_argument("--prompt-len", type=int, default=None, help="cost: prompt tokens of the prefill measurement")
    ap.add_argument("--noise-levels", default=None,
                    help="robustness: comma-separated relative noise levels, e.g. 0.001,0.004,0.01")
    ap.add_argument("--perturbations", default=None,
                    help=f"robustness: comma-separated subset of {','.join(PERTURBATIONS)} (default: all)")
    ap.add_argument("--params-removed", default=None,
                    help="quality: compare allocators at these fractions of all parameters, e.g. 0.158,0.25")
    ap.add_argument("--allocators", default=None, help="quality with --params-removed: labels from "
                    "benchmarks.quality.ALLOCATIONS (default: all of them)")
    ap.add_argument("--zero-shot", action="store_true", help="quality suite: also the zero-shot mean")
    ap.add_argument("--no-isolate", action="store_true", help="cost suite: measure in this process (tests only)")
    ap.add_argument("--sweep-val-windows", type=int, default=40, help="sweep: evenly spaced PTB validation windows")
    ap.add_argument("--sweep-test-windows", type=int, default=150, help="sweep: evenly spaced test windows per corpus")
    ap.add_argument("--sweep-grid", choices=("main", "smoothed"), default="main",
                    help="sweep: which grid (sweep.GRIDS); records go to sweep.json / sweep-<grid>.json")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def write_json(out: Path, name: str, record: dict) -> Path:
    """Write one run record atomically as ``out/name.json``."""
    out.mkdir(parents=True, exist_ok=True)
    return atomic.write_json(out / f"{name}.json", record, sort_keys=True)


def _skipped(suite: str, method: str, reason: str) -> dict:
    """The record of a method that is not installed (yet): the report shows the note instead of numbers."""
    return {"suite": suite, "method": method, "skipped": reason}


def _suite_record(wb: Workbench, args: argparse.Namespace, suite: str, method: str, seeds: list[int]) -> dict:
    """One (suite, method) record."""
    if suite == "robustness":
        return robustness.run(wb, method, args.ratio, seeds)
    if suite == "cost":
        return cost.run(wb, method, args.ratio, seeds, args.model, isolate=not args.no_isolate)
    if args.params_removed:
        return quality.allocation_suite(wb, method, args.params_removed, args.allocators, seeds)
    ratios = tuple(float(r) for r in args.ratios.split(",")) if args.ratios else wb.profile.quality_ratios
    return quality.run(wb, method, ratios, seeds, args.zero_shot)


def profile_of(args: argparse.Namespace) -> Profile:
    """The named profile with the command line's overrides applied."""
    changes: dict = {}
    if args.ppl_windows is not None:
        changes["ppl_max_windows"] = args.ppl_windows
    if args.calib_batch is not None:
        changes["calib_batch"] = args.calib_batch
    if args.speed_repeats is not None:
        changes["speed_repeats"] = args.speed_repeats
    if args.prompt_len is not None:
        changes["prompt_len"] = args.prompt_len
    if args.noise_levels:
        changes["noise_levels"] = tuple(float(x) for x in args.noise_levels.split(",") if x.strip())
    if args.perturbations:
        names = tuple(n.strip() for n in args.perturbations.split(",") if n.strip())
        unknown = sorted(set(names) - set(PERTURBATIONS))
        if unknown:
            raise UserError(f"--perturbations: unknown {unknown}; accepted: {', '.join(PERTURBATIONS)}")
        changes["perturbations"] = names
    return dataclasses.replace(PROFILES[args.profile], **changes)


def run_suites(args: argparse.Namespace) -> list[Path]:
    """Run the chosen suites and write one JSON per (suite, method); returns the files written."""
    suites = SUITES if args.suite == "all" else (args.suite,)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wb = Workbench.open(args.model, profile_of(args), args.device)
    common = {"machine": describe_machine(), "workbench": wb.describe(),
              "command": "python -m prunekit.benchmarks " + shlex.join(args.argv)}
    written = []
    for suite in suites:
        if suite == "sweep":
            record = sweep.run(wb, methods, seeds, args.ratio, args.sweep_val_windows, args.sweep_test_windows,
                               out=args.out, grid=sweep.GRIDS[args.sweep_grid])
            name = "sweep" if args.sweep_grid == "main" else f"sweep-{args.sweep_grid}"
            written.append(write_json(args.out, name, {**record, "grid": args.sweep_grid, **common,
                                                       "finished": time.time()}))
            continue
        if suite == "peer":
            record = peer.run(wb, args.ratio, seeds)
            written.append(write_json(args.out, "peer", {**record, **common, "finished": time.time()}))
            continue
        for method in methods:
            if method not in wb.registry.methods:
                record = _skipped(suite, method, f"method {method!r} is not registered in this environment "
                                                 f"(available: {', '.join(sorted(wb.registry.methods))})")
            else:
                try:
                    record = _suite_record(wb, args, suite, method, seeds)
                except UserError:
                    raise
                except Exception as exc:  # a broken method is a result for the report, not the end of the run
                    log.exception("%s %s failed", suite, method)
                    record = {"suite": suite, "method": method,
                              "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            log.info("%s %s done", suite, method)
            written.append(write_json(args.out, f"{record.get('suite', suite)}-{method}",
                                      {**record, **common, "finished": time.time()}))
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m prunekit.benchmarks`` and ``prunekit bench``; returns the exit code."""
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.suite != "report":
            for path in run_suites(args):
                log.info("wrote %s", path)
        md = report.build(args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("report: %s", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
