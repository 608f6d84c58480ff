"""Quality of wanda-sp and flap (with and without FLAP's bias compensation) on the embedded SmolLM2,
with the windows, seed, layers and calibration of docs/benchmarks.md's quality table (quick profile).

The benchmark harness prunes without running lifecycle hooks, so FLAP's compensation (applied from
``prunekit_after_pruning`` in a run) is applied here by calling the plugin's ``compensate`` directly.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/prunekit-activation-methods/scripts/quality.py \
        --ppl-windows 10 --ratios 0.1,0.25,0.4 --out /tmp/act-quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from prunekit.benchmarks.profiles import PROFILES
from prunekit.benchmarks.workbench import Workbench


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ppl-windows", type=int, default=10)
    ap.add_argument("--ratios", default="0.1,0.25,0.4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="wanda-sp,flap")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from prunekit_activation_methods import flap as flap_plugin

    profile = dataclasses.replace(PROFILES["quick"], ppl_max_windows=args.ppl_windows)
    wb = Workbench.open(None, profile)
    corpora = profile.quality_corpora
    rows = [{"method": "dense", "params": wb.model.num_parameters(),
             "ppl": {c: wb.dense_ppl(c) for c in corpora}}]
    print(rows[-1], flush=True)
    for method in args.methods.split(","):
        batches, _ = wb.calibration(args.seed)
        groups = wb.groups(wb.model)
        scores, _, seconds = wb.score(wb.model, groups, method, batches, args.seed)
        pending = flap_plugin._PENDING.pop(wb.model, None)
        for ratio in (float(r) for r in args.ratios.split(",")):
            kept = wb.keep(groups, scores, ratio)
            variants = [(method, None)] if pending is None else [("flap (no compensation)", None), ("flap", pending)]
            for label, comp in variants:
                pruned = wb.pruned(wb.model, groups, kept)
                if comp is not None:
                    flap_plugin.compensate(pruned, wb.adapter(pruned), groups, kept, comp)
                started = time.perf_counter()
                row = {"method": label, "ratio": ratio, "seed": args.seed, "params": pruned.num_parameters(),
                       "ppl": {c: wb.ppl(pruned, c) for c in corpora}, "score_seconds": round(seconds, 1),
                       "eval_seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                print(row, flush=True)
    with open(args.out, "w") as fh:
        json.dump({"profile": profile.as_dict(), "layers": [wb.layers.start, wb.layers.stop], "rows": rows}, fh,
                  indent=2)


if __name__ == "__main__":
    main()
