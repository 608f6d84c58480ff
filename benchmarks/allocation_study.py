"""The allocation study of docs/benchmarks.md: tune the measured allocator on PTB validation, then compare
allocators at equal parameters removed on PTB and WikiText-2 test (evenly spaced windows), 3 seeds.

``python -m prunekit.benchmarks.allocation_study --out DIR [--windows 60] [--seeds 0,1,2]``; one JSON line
per result in DIR/allocation-rows.jsonl (written as it goes), DIR/allocation-taylor.json at the end.
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
TUNING = tuple(
    (f"measured/{layers}/{'+'.join(kinds)}/excess {excess}", "measured",
     {**PROBE, "kinds": list(kinds), "max_excess": excess}, layers)
    for kinds, layers, excess in ((("mlp",), "all", 0.1), (("mlp",), "all", 0.2), (("attention", "mlp"), "all", 0.1),
                                  (("attention", "mlp"), "all", 0.2), (("mlp",), "default", 0.1))
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--method", default="taylor")
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fractions", default="0.158,0.25")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(args.out / "progress.log"), logging.StreamHandler()])
    rows_path = args.out / "allocation-rows.jsonl"

    def write(row: dict) -> None:
        with rows_path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    wb = Workbench.open(None, PROFILES["quick"])
    wb.cache["curves_dir"] = args.out
    fractions = tuple(float(x) for x in args.fractions.split(","))
    # 1. tuning on PTB validation, seed 0, first budget
    tuning = quality.allocation_run(wb, args.method, fractions[:1], [0], TUNING, args.windows, ("ptb",),
                                    "validation", on_row=lambda r: write({"phase": "tuning", **r}),
                                    probe=PROBE)
    measured = [r for r in tuning["rows"] if r["allocator"] == "measured"]
    best = min(measured, key=lambda r: r["ppl"]["ptb"])
    chosen = ("measured", "measured", best["options"], best["layers"])
    logging.info("tuning chose %s (PTB validation %.2f)", best["allocation"], best["ppl"]["ptb"])
    write({"phase": "choice", "chosen": best["allocation"], "options": best["options"], "layers": best["layers"]})
    # 2. the test grid
    allocations = (quality.ALLOCATIONS[0], quality.ALLOCATIONS[1], chosen, quality.ALLOCATIONS[2])
    started = time.time()
    record = quality.allocation_run(wb, args.method, fractions, [int(s) for s in args.seeds.split(",")],
                                    allocations, args.windows, on_row=lambda r: write({"phase": "test", **r}), probe=PROBE)
    record["tuning"] = tuning
    record["chosen"] = best["allocation"]
    (args.out / f"allocation-{args.method}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    logging.info("done in %.0f s", time.time() - started)


if __name__ == "__main__":
    main()
