"""How small can the measured allocator's probe be? Allocation seconds, decisions and PTB validation perplexity
for several probe sizes on the embedded SmolLM2, several calibration seeds, one process, interleaved.

``python -m prunekit.benchmarks.studies.probe_size [--seeds 0,1,2] [--configs default,lean] [--windows 40]
[--out rows.jsonl]`` prints a markdown table: per probe setting, the allocation stage's seconds (median over
seeds), how far its counts move from the default setting's (share of units allocated differently) and PTB
validation perplexity (mean and range over seeds; evenly spaced windows). Choose on validation, not test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

#: probe settings (measured allocator options) to compare; "default" is the allocator's own defaults
CONFIGS: dict[str, dict] = {
    "default": {},
    "samples-2": {"probe_samples": 2},
    "seq-64": {"probe_seq_len": 64},
    "fractions-3": {"fractions": [0.25, 0.5, 0.75]},
    "search-10": {"search_steps": 10},
    "lean": {"probe_samples": 2, "probe_seq_len": 64, "fractions": [0.25, 0.5, 0.75], "search_steps": 10},
    "lean-search-20": {"probe_samples": 2, "probe_seq_len": 64, "fractions": [0.25, 0.5, 0.75], "search_steps": 20},
}


def moved(counts: dict[str, int], reference: dict[str, int], groups: dict[str, int]) -> float:
    """Share of all units whose removal differs between two allocations (half the L1 distance of the counts)."""
    return sum(abs(counts[g] - reference[g]) for g in counts) / 2 / sum(groups.values())


def run(seeds: list[int], names: list[str], windows: int, method: str, ratio: float) -> list[dict]:
    """One row per (setting, seed): allocation seconds, counts and PTB validation perplexity."""
    import prunekit
    from prunekit.allocation.probe import LossProbe
    from prunekit.eval.perplexity import perplexity

    probed = {"calls": 0, "tokens": 0}  # the probe's work, a load-independent companion of its seconds
    original = LossProbe.loss

    def counted(self, *args, **kwargs):
        probed["calls"] += 1
        probed["tokens"] += sum(b.numel() for b in self.batches)
        return original(self, *args, **kwargs)

    LossProbe.loss = counted
    dense, tokenizer, _ = prunekit.load_model()
    rows = []
    for seed in seeds:  # settings interleaved within a seed, so machine load drifts evenly over them
        for name in names:
            model = copy.deepcopy(dense)
            probed.update(calls=0, tokens=0)
            started = time.perf_counter()
            result = prunekit.prune(model, tokenizer, method=method, ratio=ratio, calibration={"seed": seed},
                                    allocation={"name": "measured", "options": CONFIGS[name]})
            wall = time.perf_counter() - started
            ppl = perplexity(model, tokenizer, "ptb", split="validation", max_windows=windows)["ppl"]
            rows.append({"setting": name, "seed": seed, "select_s": result.timings["select"], "prune_s": wall,
                         "counts": result.allocation["counts"], "units": {g.name: g.n_units for g in result.groups},
                         "removed_fraction": result.reduction["params_removed_fraction"], "ppl_ptb_val": ppl,
                         "probe_calls": probed["calls"], "probe_tokens": probed["tokens"],
                         "loadavg": os.getloadavg()[0]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("counts", "units")}), flush=True)
            del model
    return rows


def table(rows: list[dict]) -> list[str]:
    """Markdown: per setting, median allocation seconds, units moved vs default, PTB validation perplexity."""
    default = {r["seed"]: r["counts"] for r in rows if r["setting"] == "default"}
    out = ["| probe setting | probe calls × tokens | allocation s (median) | units moved vs default "
           "| PTB val ppl mean | range |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name]
        ppl = [r["ppl_ptb_val"] for r in mine]
        move = [moved(r["counts"], default[r["seed"]], r["units"]) for r in mine if r["seed"] in default]
        work = f"{mine[0]['probe_calls']} × {mine[0]['probe_tokens'] // max(mine[0]['probe_calls'], 1)}"
        out.append(f"| {name} `{json.dumps(CONFIGS.get(name, {}))}` | {work} "
                   f"| {statistics.median(r['select_s'] for r in mine):.1f} "
                   f"| {statistics.mean(move) * 100:.1f} % | {statistics.mean(ppl):.2f} | {min(ppl):.2f}–{max(ppl):.2f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--windows", type=int, default=40, help="evenly spaced PTB validation windows")
    parser.add_argument("--method", default="taylor")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("probe_size.jsonl"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run([int(s) for s in args.seeds.split(",")], args.configs.split(","), args.windows, args.method,
               args.ratio)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
