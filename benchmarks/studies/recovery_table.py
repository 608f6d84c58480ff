"""What repair and recovery buy, inside and outside the calibration domain (docs/recovery.md).

Prunes the embedded SmolLM2 once per (budget, seed) with the default allocator (taylor scores, cached under
``--cache``), then per variant repairs and/or recovers a copy and measures perplexity on PTB test and WikiText-2
test (evenly spaced windows, the same for every row), PTB and pd-books validation (for choosing), and optionally
zero-shot accuracy on a fair sample (a domain no calibration or recovery text comes from). Every repair and
recovery text is pd-books (public-domain books, neither PTB nor WikiText-2) unless ``--text`` says otherwise (any
source prunekit reads, or a mixture such as ``pd-books+ptb``). A budget may name the pruning's own calibration text
(scores and the allocator's probe; without ``@``, PTB): ``ratio:0.25@pd-books+ptb``.

    python -m prunekit.benchmarks.studies.recovery_table --budgets ratio:0.25 params:0.25 --seeds 0 1 2 \\
        --variants none refit lora@32768 distill@32768 refit+distill@32768 --out rows.jsonl --cache /tmp/rt

A variant is ``[refit+]{none|lora|distill}[@TOKENS]``: about TOKENS recovery tokens in one epoch (texts of
>= 64 words, ~150 tokens each, cut at ``--cutoff``; each row records the tokens trained on). ``--milestones M ...``
also evaluates a training variant when it has seen about M of its tokens, as rows ``VARIANT:M`` (points on one run's
learning curve: the learning rate still decays over the whole run). Rows already in ``--out`` (same budget, seed,
variant and learning rate) are skipped (resumable); ``--summarize`` prints the markdown table.
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

from prunekit.benchmarks.studies.rows import read_rows

DEFAULT_LR = 1e-4  # rows written before the learning rate was recorded used it
DEFAULT_TEXT = "pd-books"  # the repair and recovery text unless --text says otherwise
TEST = {"ptb_test": ("ptb", "test"), "wikitext2_test": ("wikitext2", "test")}


REPAIRS = ("refit", "bias")


def parse_variant(spec: str) -> tuple[str, str, int]:
    """``refit+distill@32768`` → (repair first: none, refit or bias; trainer; recovery tokens); a learning-curve
    point ``refit+lora@524288:131072`` (131072 tokens into a 524288-token run) gives its tokens so far."""
    spec, _, point = spec.partition(":")
    if point:
        repair, trainer, _ = parse_variant(spec)
        return repair, trainer, int(point)
    repair, _, rest = spec.rpartition("+")
    trainer, _, tokens = rest.partition("@")
    if repair not in ("", *REPAIRS) or trainer not in ("none", *REPAIRS, "lora", "distill") \
            or (repair and trainer in REPAIRS):
        raise SystemExit(f"--variants: {spec!r} is not [refit+|bias+]{{none|lora|distill}}[@TOKENS], refit or bias")
    if trainer in REPAIRS:
        return trainer, "none", 0
    return repair or "none", trainer, int(tokens or 0)


def budget_kwargs(spec: str) -> dict:
    """``ratio:0.25`` (LLM-Pruner's per-layer ratio: 15.79 % of SmolLM2) or ``params:0.25`` (a parameter fraction),
    optionally ``@SOURCE``: the text the scores and the allocator's probe are calibrated on (default: ``ptb``, the
    text every row without ``@`` was pruned with)."""
    spec, _, source = spec.partition("@")
    kind, _, value = spec.partition(":")
    extra = {"calibration": {"source": source or "ptb"}}
    if kind == "ratio":
        return {"ratio": float(value), **extra}
    if kind == "params":
        return {"allocation": {"name": "measured", "params_removed": float(value)}, **extra}
    raise SystemExit(f"--budgets: {spec!r} is not ratio:R or params:F, optionally @SOURCE")


def cache_name(budget: str, seed: int) -> str:
    """The cache folder of one (budget, seed): ``ratio:0.25@0.5*pd-books+0.5*ptb`` → ``ratio-0.25@0.5x...``."""
    return f"{budget.replace(':', '-').replace('*', 'x').replace('/', '_')}-seed{seed}"


def pruned_model(dense, tokenizer, budget: str, seed: int, cache: Path | None):
    """The pruned model, its kept columns and the fraction removed; made once per (budget, seed) when cached."""
    import prunekit
    from prunekit.builtin.repair import kept_columns

    folder = cache / cache_name(budget, seed) if cache else None
    if folder is not None and (folder / "columns.pt").exists():
        model, _, _ = prunekit.load_model(str(folder))
        info = json.loads((folder / "run.json").read_text())
        return model, torch.load(folder / "columns.pt"), info["reduction"]["params_removed_fraction"]
    model = copy.deepcopy(dense)
    result = prunekit.prune(model, tokenizer, method="taylor", seed=seed, **budget_kwargs(budget))
    columns = kept_columns(result)
    if folder is not None:
        prunekit.save(result, folder, overwrite=True)
        torch.save(columns, folder / "columns.pt")
    return model, columns, result.reduction["params_removed_fraction"]


def evaluate(model, tokenizer, windows: int, zero_shot: list[str], limit: int) -> dict:
    """Perplexities on the test and validation corpora (evenly spaced windows), and zero-shot when asked."""
    from prunekit.data.pd_books import pd_books_text
    from prunekit.eval.perplexity import perplexity

    corpora = {**TEST, "ptb_validation": ("ptb", "validation"), "pdbooks_validation": pd_books_text("validation")}
    out = {}
    for name, spec in corpora.items():
        source, split = spec if isinstance(spec, tuple) else (spec, "-")
        out[name] = round(perplexity(model, tokenizer, source, window=128, max_windows=windows, progress=False,
                                     split=split)["ppl"], 3)
    if zero_shot:
        from prunekit.eval.zero_shot import zero_shot as run_zero_shot

        result = run_zero_shot(model, tokenizer, zero_shot, limit=limit)
        out["zero_shot"] = {t: round(v["value"], 4) for t, v in result["tasks"].items()}
        out["zero_shot_mean"] = round(result["mean"], 4)
    return out


def milestone_callback(milestones: list[int], total: int, on_milestone):
    """A TrainerCallback calling ``on_milestone(model, milestone, tokens)`` once each milestone's share of the run's
    steps is done (``tokens`` = the share of ``total``, the run's tokens, done at that step; examples are shuffled,
    so it is the expected count, within about one example of the true one)."""
    from transformers import TrainerCallback

    class Milestones(TrainerCallback):
        def __init__(self) -> None:
            self.pending = sorted(m for m in milestones if m < total)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen = total * state.global_step / state.max_steps
            while self.pending and seen >= self.pending[0]:
                on_milestone(model, self.pending.pop(0), round(seen))

    return Milestones()


def recover(model, dense, tokenizer, trainer: str, tokens: int, text: str, cutoff: int, seed: int, lr: float,
            milestones: list[int] = (), on_milestone=None) -> dict:
    """Recovery through the registered trainer, ``tokens`` tokens of ``text`` in one epoch; ``on_milestone(model,
    milestone, tokens_so_far)`` is called (with the model being trained) at each of ``milestones``."""
    from prunekit.core.config import RunConfig
    from prunekit.plugin.registry import get_registry

    entry = get_registry().named("recovery", trainer)
    # recovery texts are runs of >= 64 words, about 150 tokens each: the row records the tokens really trained on
    options = entry.impl.Options(source=text, max_examples=max(1, round(tokens / 150)), cutoff_len=cutoff, epochs=1,
                                 seed=seed, lr=lr)
    config = RunConfig(seed=seed, device="cpu")
    impl = entry.impl(options)
    if milestones and on_milestone is not None:
        total = sum(map(len, impl.examples(tokenizer, seed)))  # the tokens the trainer will draw
        impl.callbacks.append(milestone_callback(list(milestones), total, on_milestone))
    if getattr(entry.impl, "needs_teacher", False):
        return impl.recover(model, tokenizer, config, teacher=dense)
    return impl.recover(model, tokenizer, config)


def run(args: argparse.Namespace) -> None:
    import prunekit

    done = {key(r) for r in read_rows(args.out)}
    dense, tokenizer, _ = prunekit.load_model()
    dense.requires_grad_(False)
    if key({"budget": "dense", "seed": -1, "variant": "dense"}) not in done and args.dense:
        write(args.out, {"budget": "dense", "seed": -1, "variant": "dense", "params_removed": 0.0,
                         **evaluate(dense, tokenizer, args.windows, args.zero_shot, args.zero_shot_limit)})
    for budget in args.budgets:
        for seed in args.seeds:
            todo = list(dict.fromkeys((v, lr_of(v, lr)) for v in args.variants for lr in args.lr
                                      if key({"budget": budget, "seed": seed, "variant": v, "lr": lr,
                                              "text": args.text}) not in done))
            if not todo:
                continue
            pruned, columns, removed = pruned_model(dense, tokenizer, budget, seed, args.cache)
            repaired: dict[str, tuple] = {}  # repair -> (model, seconds): deterministic per (budget, seed), fit once
            for spec, lr in todo:
                repair, trainer, tokens = parse_variant(spec)
                row = {"budget": budget, "seed": seed, "variant": spec, "params_removed": removed, "text": args.text,
                       "recovery_tokens": tokens, "repair_s": 0.0, "recover_s": 0.0}
                if trainer != "none":
                    row["lr"] = lr
                if repair != "none":
                    if repair not in repaired:
                        model = copy.deepcopy(pruned)
                        repaired[repair] = (model, repair_model(repair, model, dense, tokenizer, columns, seed,
                                                                args.text))
                    row["repair_s"] = repaired[repair][1]
                    model = copy.deepcopy(repaired[repair][0])
                else:
                    model = copy.deepcopy(pruned)
                if trainer != "none":
                    started = time.perf_counter()
                    paused = [0.0]  # seconds spent evaluating learning-curve points, not training

                    def point(trained, milestone, so_far, spec=spec, row=row, started=started, paused=paused):
                        began = time.perf_counter()
                        write(args.out, {**row, "variant": f"{spec}:{milestone}", "trained_tokens": so_far,
                                         "recover_s": round(began - started - paused[0], 1),
                                         **evaluate(trained, tokenizer, args.windows, args.zero_shot,
                                                    args.zero_shot_limit), **load()})
                        paused[0] += time.perf_counter() - began

                    info = recover(model, dense, tokenizer, trainer, tokens, args.text, args.cutoff, seed, lr,
                                   milestones=args.milestones, on_milestone=point)
                    row["recover_s"] = round(time.perf_counter() - started - paused[0], 1)
                    row["trained_tokens"] = info.get("tokens")
                row.update(evaluate(model, tokenizer, args.windows, args.zero_shot, args.zero_shot_limit))
                row.update(load())
                write(args.out, row)
                del model


def repair_model(repair: str, model, dense, tokenizer, columns: dict, seed: int, text: str) -> float:
    """Repair ``model`` in place with ``refit`` or ``bias`` (each with its defaults, fitted on ``text``); seconds."""
    from prunekit.builtin.repair import BiasOptions, RefitOptions, bias_compensate, refit
    from prunekit.data.sources import calibration_batches
    from prunekit.plugin.registry import get_registry

    o = (RefitOptions if repair == "refit" else BiasOptions)(source=text)
    ids, _ = calibration_batches(tokenizer, source=o.source, n_samples=o.n_samples, seq_len=o.seq_len, seed=seed + 2)
    batches, adapter = list(ids.split(8)), get_registry().adapter_for(model)
    started = time.perf_counter()
    if repair == "refit":
        refit(model, dense, adapter, batches, ridge=o.ridge, columns=columns, inputs=o.inputs, anchor=o.anchor)
    else:
        bias_compensate(model, dense, adapter, batches, columns=columns, inputs=o.inputs, which=o.which)
    return round(time.perf_counter() - started, 1)


def key(row: dict) -> tuple:
    """What makes a row unique: budget, seed, variant and, for trained variants, the learning rate; for repaired or
    trained ones, their text."""
    budget, variant, lr, text = group(row)
    return budget, row["seed"], variant, lr, text


def group(row: dict) -> tuple:
    """What the seeds of one table row share: budget, variant, learning rate (trained variants), text (repaired or
    trained ones; rows written before the text was recorded used pd-books)."""
    variant = row["variant"]
    lr = lr_of(variant, row.get("lr", DEFAULT_LR))
    text = None if variant in ("dense", "none") else row.get("text", DEFAULT_TEXT)
    return row["budget"], variant, lr, text


def lr_of(variant: str, lr: float) -> float | None:
    """The learning rate that matters for ``variant`` (None when nothing is trained)."""
    return None if variant == "dense" or parse_variant(variant)[1] == "none" else lr


def load() -> dict:
    """The machine's load and this process's threads, recorded with every timed row."""
    return {"loadavg": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads()}


def write(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def summarize(rows: list[dict]) -> list[str]:
    """Markdown: per budget and variant, mean (min–max over seeds) of each corpus, ratio to dense, seconds."""
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    cols = ["ptb_test", "wikitext2_test", "ptb_validation", "pdbooks_validation"]
    has_zs = any("zero_shot_mean" in r for r in rows)
    head = "| budget | variant | seeds | " + " | ".join(cols) + (" | zero-shot mean" if has_zs else "") + \
        " | repair s | recover s |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    if dense:
        out.append("| dense | – | – | " + " | ".join(f"{dense[c]:.2f}" for c in cols) +
                   (f" | {dense.get('zero_shot_mean', float('nan')):.3f}" if has_zs else "") + " | – | – |")
    for shared in dict.fromkeys(group(r) for r in rows if r["variant"] != "dense"):
        mine = [r for r in rows if group(r) == shared]
        cells = []
        for c in cols:
            vals = [r[c] for r in mine]
            ratio = f" ({statistics.mean(vals) / dense[c]:.2f}×)" if dense else ""
            spread = f" [{min(vals):.1f}–{max(vals):.1f}]" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.2f}{ratio}{spread}")
        zs = ""
        if has_zs:
            vals = [r["zero_shot_mean"] for r in mine if "zero_shot_mean" in r]
            zs = f" | {statistics.mean(vals):.3f}" if vals else " | –"
        budget, variant, lr, text = shared
        label = variant + (f" lr {lr:g}" if lr is not None else "") + \
            (f" on {text}" if text not in (None, DEFAULT_TEXT) else "")
        out.append(f"| {budget} | {label} | {len(mine)} | " + " | ".join(cells) + zs +
                   f" | {statistics.median(r['repair_s'] for r in mine):.0f} "
                   f"| {statistics.median(r['recover_s'] for r in mine):.0f} |")
    return out


def plot(rows: list[dict], path: Path) -> Path:
    """Perplexity (mean over seeds) against recovery tokens, one line per repair + trainer + learning rate + run
    length (a run's learning-curve points share its line), starting from the same seeds' untrained model; one panel
    per test corpus and one for the recovery text's own validation books; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r["variant"] == "dense"), None)
    pruned = [r for r in rows if r["variant"] != "dense"]
    curves: dict[tuple, list[dict]] = {}
    for r in pruned:
        repair, trainer, _ = parse_variant(r["variant"])
        if trainer != "none":
            run_length = parse_variant(r["variant"].partition(":")[0])[2]
            curves.setdefault((r["budget"], repair, trainer, r.get("lr", DEFAULT_LR), run_length,
                               r.get("text", DEFAULT_TEXT)), []).append(r)
    corpora = [*TEST, "pdbooks_validation"]
    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 6.5))
    for ax, corpus in zip(axes, corpora):
        for i, ((budget, repair, trainer, lr, run_length, text), trained) in enumerate(curves.items()):
            seeds = {r["seed"] for r in trained}
            start = [r[corpus] for r in pruned if r["budget"] == budget and r["seed"] in seeds
                     and parse_variant(r["variant"]) == (repair, "none", 0)
                     and (repair == "none" or r.get("text", DEFAULT_TEXT) == text)]
            points: dict[int, list[tuple[float, float]]] = {}  # tokens asked -> (trained, perplexity) per seed
            for r in trained:
                points.setdefault(parse_variant(r["variant"])[2], []).append((r.get("trained_tokens") or 0, r[corpus]))
            xs = sorted(points)
            x = ([0.0] if start else []) + [statistics.mean(t for t, _ in points[k]) for k in xs]
            y = ([statistics.mean(start)] if start else []) + [statistics.mean(v for _, v in points[k]) for k in xs]
            first = "" if repair == "none" else f"{repair} + "
            on = "" if text == DEFAULT_TEXT else f" on {text}"
            label = f"{budget} {first}{trainer}{on} lr {lr:g}, {run_length // 1024}k-token run"
            ax.plot(x, y, marker="o" if budget.startswith("ratio") else "s", color=plt.cm.tab20(i % 20),
                    linestyle="-" if text == DEFAULT_TEXT else ":", label=label)
        if dense:
            ax.axhline(dense[corpus], linestyle="--", color="grey", label="dense")
        ax.set(title=corpus, xlabel="recovery tokens (the recovery text)", ylabel="perplexity")
        ax.set_xscale("symlog", linthresh=8192)
        ax.set_xlim(left=0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.022 * ((len(labels) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["ratio:0.25"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["none", "refit", "lora@32768", "distill@32768",
                                                          "refit+distill@32768"])
    parser.add_argument("--text", default="pd-books", help="repair and recovery text (never WikiText-2 for the "
                                                             "out-of-domain claim)")
    parser.add_argument("--cutoff", type=int, default=256, help="tokens per recovery example")
    parser.add_argument("--lr", type=float, nargs="+", default=[DEFAULT_LR],
                        help="learning rate(s) of the trained variants (each is a row)")
    parser.add_argument("--milestones", type=int, nargs="*", default=[],
                        help="also evaluate each training variant after about this many tokens")
    parser.add_argument("--windows", type=int, default=80, help="evenly spaced 128-token windows per corpus")
    parser.add_argument("--zero-shot", nargs="*", default=[], help="zero-shot tasks (a third domain)")
    parser.add_argument("--zero-shot-limit", type=int, default=200)
    parser.add_argument("--no-dense", dest="dense", action="store_false")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--plot", type=Path, help="with --summarize: also draw perplexity vs recovery tokens here")
    args = parser.parse_args(argv)
    if args.summarize:
        rows = read_rows(args.out)
        print("\n".join(summarize(rows)))
        if args.plot:
            plot(rows, args.plot)
        return
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
