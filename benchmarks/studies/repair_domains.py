"""Measure repair on the embedded SmolLM2: prune, repair with each variant, evaluate perplexity (docs/repair.md).

``python -m prunekit.builtin.repair.bench --seeds 42 43 --out rows.jsonl`` writes one JSON line per row:
seed, calibration text, repair variant, ridge, repair seconds, perplexity on PTB test and WikiText-2 test
(the same evenly spaced windows for every row) and, for choosing the ridge, on PTB validation (and on
pd-books validation, to see the calibration text's domain). Every re-fit variant runs at every ``--ridges``
value; choose on a validation column, report the test columns of the chosen row.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch


def windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` seeded random windows of ``seq_len`` tokens (the sampling of ``prunekit.data.calibration_batches``)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def calibration(tokenizer, source: str, n: int, seq_len: int, seed: int, batch_size: int) -> list[torch.Tensor]:
    from prunekit.data.pd_books import pd_books_text
    from prunekit.data.sources import load_text, token_ids

    text = pd_books_text("train") if source == "pd-books" else load_text(source, "train")
    return list(windows(token_ids(tokenizer, text), n, seq_len, seed).split(batch_size))


def ppl(model, tokenizer, corpora: dict, max_windows: int) -> dict[str, float]:
    """Perplexity over ``max_windows`` evenly spaced 128-token windows of each corpus ((source, split) or a Text)."""
    from prunekit.eval.perplexity import perplexity

    out = {}
    for name, spec in corpora.items():
        source, split = spec if isinstance(spec, tuple) else (spec, "-")
        out[name] = round(perplexity(model, tokenizer, source, window=128, max_windows=max_windows, progress=False,
                                     split=split)["ppl"], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--allocator", default="measured", help="measured (default) or uniform-mlp")
    parser.add_argument("--samples", type=int, default=64, help="repair calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows per corpus")
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-2], help="ridges of variants given without")
    parser.add_argument("--cache", type=Path, help="keep each seed's pruned model here and reuse it")
    parser.add_argument("--sources", nargs="+", default=["ptb", "pd-books"])
    parser.add_argument("--variants", nargs="+", default=["bias", "refit-seq", "refit-dense", "refit-seq@pruned"],
                        help="bias | refit-seq | refit-dense, '+bias' fits an intercept, '@pruned' anchors the "
                             "ridge at the pruned weights; ':0.01,0.1' gives the variant its own ridges")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import prunekit
    from prunekit.builtin.repair import bias_compensate, kept_columns, pd_books_text, refit
    from prunekit.plugin.registry import get_registry

    allocation = ({"name": "uniform", "options": {"kinds": ["mlp"]}} if args.allocator == "uniform-mlp"
                  else {"name": args.allocator})
    test = {"ptb_test": ("ptb", "test"), "wikitext2_test": ("wikitext2", "test")}
    valid = {"ptb_validation": ("ptb", "validation"), "pdbooks_validation": pd_books_text("validation")}

    def write(row: dict) -> None:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for seed in args.seeds:
        dense, tokenizer, _ = prunekit.load_model()
        cached = args.cache / f"{args.allocator}-{args.ratio}-seed{seed}" if args.cache else None
        if cached is not None and (cached / "columns.pt").exists():
            model, _, _ = prunekit.load_model(str(cached))
            info = json.loads((cached / "run.json").read_text())
            columns = torch.load(cached / "columns.pt")
            removed, prune_s = info["reduction"]["params_removed_fraction"], info["timings"]["total"]
        else:
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            result = prunekit.prune(model, tokenizer, method="taylor", ratio=args.ratio, seed=seed,
                                    allocation=allocation)
            prune_s = time.perf_counter() - started
            columns, removed = kept_columns(result), result.reduction["params_removed_fraction"]
            if cached is not None:
                result.timings["total"] = prune_s
                prunekit.save(result, cached, overwrite=True)
                torch.save(columns, cached / "columns.pt")
        base = {"seed": seed, "allocator": args.allocator, "samples": args.samples, "seq_len": args.seq_len,
                "params_removed": removed, "prune_s": round(prune_s, 1)}
        corpora = {**test, **valid}
        write({**base, "calibration": None, "variant": "none", "ridge": None, "repair_s": 0.0,
               **ppl(model, tokenizer, corpora, args.windows)})
        for source in args.sources:
            batches = calibration(tokenizer, source, args.samples, args.seq_len, seed, args.batch_size)
            runs = []
            for spec in args.variants:
                variant, _, own = spec.partition(":")
                ridges = [float(r) for r in own.split(",")] if own else args.ridges
                runs += [(variant, None)] if variant == "bias" else [(variant, r) for r in ridges]
            for variant, ridge in runs:
                m = copy.deepcopy(model)
                adapter = get_registry().adapter_for(m)
                t0 = time.perf_counter()
                if variant == "bias":
                    report = bias_compensate(m, dense, adapter, batches, columns=columns)
                else:
                    report = refit(m, dense, adapter, batches, ridge=ridge, columns=columns,
                                   inputs="dense" if variant.startswith("refit-dense") else "sequential",
                                   fit_bias="+bias" in variant, anchor="pruned" if "@pruned" in variant else "zero")
                seconds = time.perf_counter() - t0
                errors = [layer[k]["rel_error_after"] for layer in report["layers"] for k in ("attention", "mlp")
                          if k in layer]
                before = [layer[k]["rel_error_before"] for layer in report["layers"] for k in ("attention", "mlp")
                          if k in layer]
                write({**base, "calibration": source, "variant": variant, "ridge": ridge, "repair_s": round(seconds, 1),
                       "projections": report["projections"],
                       "mean_rel_error_before": round(sum(before) / len(before), 4),
                       "mean_rel_error_after": round(sum(errors) / len(errors), 4),
                       **ppl(m, tokenizer, corpora, args.windows)})
                del m


if __name__ == "__main__":
    main()
