"""The allocation study of docs/benchmarks.md: tune allocators on PTB validation (``--phase tune``), then
compare the chosen one with uniform at equal parameters removed on PTB and WikiText-2 test (``--phase test``),
evenly spaced windows, for each scoring method (``--methods taylor,moreau-gs``).

``python -m prunekit.benchmarks.studies.allocation_study --out DIR [--phase tune] [--windows 60] [--seeds 0,1]
[--fractions 0.1,0.35] [--allocations uniform,uniform-mlp,measured+search,global]``; one
JSON line per result in DIR/allocation-rows.jsonl (written as it goes), DIR/allocation-PHASE-METHOD.json at
the end of each method.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from prunekit.benchmarks import quality
from prunekit.benchmarks.profiles import PROFILES
from prunekit.benchmarks.workbench import Workbench

PROBE = {"fractions": [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]}  # the measured allocator's default levels
SEARCH = {"search_steps": 40}  # the local search, on the knapsack's probe (4 x 128 tokens)
#: candidates tuned on PTB validation against uniform / uniform-mlp (label, allocator, options, layers)
TUNING = (
    ("uniform", "uniform", {}, "default"),
    ("uniform-mlp", "uniform", {"kinds": ["mlp"]}, "default"),
    ("measured", "measured", {**PROBE, "search_steps": 0}, "all"),  # the knapsack alone
    ("measured+search", "measured", {**PROBE, **SEARCH}, "all"),
    ("measured-mlp+search", "measured", {**PROBE, **SEARCH, "kinds": ["mlp"]}, "all"),
)
#: further allocations the test and cost phases may name (--allocations); not tuned
OTHERS = (("global", "global", {}, "default"),)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default="taylor", help="comma-separated scoring methods (e.g. taylor,moreau-gs)")
    ap.add_argument("--phase", choices=("tune", "test", "cost"), default="tune",
                    help="tune: the candidates on PTB validation; test: uniform, uniform-mlp and --chosen on the test "
                         "splits; cost: pruned/dense throughput of those three allocations")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--chosen", default="measured+search", help="test phase: the tuning label to compare")
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fractions", default="0.158,0.25")
    ap.add_argument("--candidates", default=None, help="tune phase: comma-separated labels of TUNING (default: all)")
    ap.add_argument("--allocations", default=None,
                    help="test and cost phases: comma-separated labels of TUNING or OTHERS (e.g. global) instead of "
                         "uniform, uniform-mlp and --chosen")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(args.out / "progress.log"), logging.StreamHandler()])
    rows_path = args.out / "allocation-rows.jsonl"

    def write(row: dict) -> None:
        with rows_path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    fractions = tuple(float(x) for x in args.fractions.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    known = {c[0]: c for c in TUNING + OTHERS}
    if args.phase == "tune":
        wanted = args.candidates.split(",") if args.candidates else [c[0] for c in TUNING]
        allocations, corpora, split = tuple(known[w] for w in wanted), ("ptb",), "validation"
    else:  # test and cost
        allocations, corpora, split = (known["uniform"], known["uniform-mlp"], known[args.chosen]), \
            ("ptb", "wikitext2"), "test"
        if args.allocations:
            unknown = [w for w in args.allocations.split(",") if w not in known]
            if unknown:
                ap.error(f"--allocations: unknown {unknown}; accepted: {', '.join(known)}")
            allocations = tuple(known[w] for w in args.allocations.split(","))
    wb = Workbench.open(args.model, PROFILES["quick"], args.device)
    wb.cache["curves_dir"] = args.out
    if args.phase == "cost":
        from prunekit.benchmarks.cost import allocation_throughput

        for method in args.methods.split(","):
            record = allocation_throughput(wb, method, fractions, allocations, seeds[0], PROBE)
            (args.out / f"allocation-cost-{method}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        return
    for method in args.methods.split(","):
        started = time.time()
        record = quality.allocation_run(wb, method, fractions, seeds, allocations, args.windows, corpora, split,
                                        on_row=lambda r: write({"phase": args.phase, "method": method, **r}),
                                        probe=PROBE)
        (args.out / f"allocation-{args.phase}-{method}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        logging.info("%s done in %.0f s", method, time.time() - started)


if __name__ == "__main__":
    main()
