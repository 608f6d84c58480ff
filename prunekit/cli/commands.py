"""``prunekit`` command line: run | methods | plugins | eval | recover | export. Bad input: one line on stderr,
exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from prunekit.cli.failures import DEBUG_ENV, guarded
from prunekit.core.gguf_types import GGUF_BLOCKS
from prunekit.errors import EvaluationFailed, UserError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UserError) instead of usage text plus a message."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunekit", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="show lm-eval's, datasets' and transformers' warnings and log lines as they come (a run "
                             "records them in run.json), and full tracebacks of plugins that fail to load "
                             "(PRUNEKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="prune a model, evaluate it before and after, save it")
    run.add_argument("--method", help="importance method (see `prunekit methods`); default moreau-gs")
    run.add_argument("--model", help="hub id or local path; default: the embedded SmolLM2-135M-Instruct")
    run.add_argument("--ratio", type=float,
                     help="fraction of attention units and MLP channels removed per pruned layer")
    run.add_argument("--params-removed", type=float, metavar="F",
                     help="fraction of ALL parameters to remove (met from below; overrides --ratio as the budget)")
    run.add_argument("--allocator", help="where the removal goes: measured (default), uniform, global "
                                         "(see docs/allocation.md)")
    run.add_argument("--calibration", metavar="SOURCE",
                     help="text the scores and the allocator's probe are calibrated on: a named source (pd-books, "
                          "ptb, ...), a local file or folder of *.txt, or a mixture (0.7*my/texts/+0.3*pd-books)")
    run.add_argument("--repair", help="repair the kept weights after pruning: none (default), bias, refit "
                                      "(see docs/repair.md)")
    run.add_argument("--recovery", help="fine-tune after pruning and repair: none (default), lora, distill (from the "
                                        "dense model), or a plugin's trainer (docs/recovery.md)")
    run.add_argument("--export", choices=["gguf"], help="also write the pruned model for a serving engine: gguf "
                                                         "(llama.cpp; model-TYPE.gguf in the output, docs/gguf.md)")
    run.add_argument("--export-type", choices=list(GGUF_BLOCKS),
                     help="GGUF tensor type (default f16; q8_0 and q4_0 round MLP widths to 32 unless round_to is set)")
    run.add_argument("--output", type=Path, help="output directory (default ./pruned-METHOD)")
    run.add_argument("--config", type=Path, help="YAML or TOML run config; flags override it")
    run.add_argument("--seed", type=int)
    _device_flags(run)
    run.add_argument("--gradient-checkpointing", action="store_true", default=None,
                     help="recompute activations in the backward pass (less calibration memory, same gradient)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--compute-dtype", choices=["model", "float32"],
                     help="scoring precision: the model's own dtype (default) or float32 (docs/precision.md)")
    run.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty output directory")
    run.add_argument("--no-eval", action="store_true", help="skip evaluation before and after pruning")
    run.add_argument("--no-eval-cache", action="store_true",
                     help="evaluate the dense model again instead of reusing its cached 'before' metrics")
    run.add_argument("--no-allocation-cache", action="store_true",
                     help="probe again instead of reusing a cached measured allocation of the same model and scores")
    run.add_argument("--stability", type=int, metavar="K",
                     help="score K calibration resamples, report per-layer overlap and undecided units, "
                          "prune with the consensus")
    run.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="method option, e.g. -o variant=second (repeatable; value parsed as JSON if it can be)")

    sub.add_parser("methods", help="list methods with their provider and options")
    sub.add_parser("plugins", help="installed plugins and their hooks as JSON")

    ev = sub.add_parser("eval", help="evaluate one model (perplexity and zero-shot)")
    ev.add_argument("--model", help="hub id or local path; default: the embedded model")
    ev.add_argument("--config", type=Path, help="YAML/TOML file whose `evaluation` section is used")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    _device_flags(ev)
    ev.add_argument("--limit", type=int, help="zero-shot examples per task (default from config)")
    ev.add_argument("--full", action="store_true", help="full evaluation sets (no window or example limits)")
    ev.add_argument("--json", type=Path, help="also write the metrics to this file")
    ex = sub.add_parser("export", help="write a pruned checkpoint in a serving engine's format (GGUF for llama.cpp)")
    ex.add_argument("pruned", metavar="PRUNED_DIR", help="a checkpoint `prunekit run` saved (any LLaMA-family folder)")
    ex.add_argument("--format", choices=["gguf"], default="gguf")
    ex.add_argument("--type", choices=list(GGUF_BLOCKS), default="f16",
                    help="tensor type of the weights (q4_0: the output matrix in q8_0, docs/gguf.md)")
    ex.add_argument("--output", type=Path, required=True, help="the .gguf file to write")
    rec = sub.add_parser("recover", help="recovery fine-tuning of a pruned checkpoint (also under accelerate launch)")
    rec.add_argument("pruned", metavar="PRUNED_DIR", help="a checkpoint `prunekit run` saved")
    rec.add_argument("--output", type=Path, required=True, help="output directory (written by the main process only)")
    rec.add_argument("--config", type=Path, help="YAML or TOML file whose `recovery` section (and seed) is used")
    rec.add_argument("--recovery", help="recovery trainer (default: the config's, else lora)")
    rec.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="recovery option, e.g. -o max_examples=512 (repeatable; value parsed as JSON if it can be)")
    rec.add_argument("--seed", type=int)
    rec.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    rec.add_argument("--device", choices=["cpu", "cuda"], help="single process only; launched processes use their own")
    rec.add_argument("--overwrite", action="store_true", default=None, help="replace a previous prunekit output")
    sub.add_parser("bench", help="robustness, quality and cost benchmarks; `prunekit bench --help` for options",
                   add_help=False)
    return parser


def _device_flags(parser: argparse.ArgumentParser) -> None:
    """--device, --device-map, --max-memory, --offload-folder (validated by the config: docs/devices.md)."""
    parser.add_argument("--device", metavar="DEVICE", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--device-map", metavar="MAP",
                        help="accelerate placement: auto, balanced, balanced_low_0, sequential or JSON module->device")
    parser.add_argument("--max-memory", metavar="MEM", help="memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    parser.add_argument("--offload-folder", type=Path, metavar="DIR", help="where modules mapped to disk are offloaded")


def _device_overrides(args: argparse.Namespace) -> dict:
    return {"device": args.device, "device_map": args.device_map, "max_memory": args.max_memory,
            "offload_folder": args.offload_folder}


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option: expected KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_run(args: argparse.Namespace) -> int:
    from prunekit.core.config import read_config_file, resolve_config
    from prunekit.eval.report import print_run_summary
    from prunekit.pipeline.run import run
    from prunekit.runtime.paths import expand_path

    file_values = read_config_file(expand_path(args.config, "--config")) if args.config else {}
    overrides = {"method": args.method, "model": args.model, "ratio": args.ratio, "output": args.output,
                 "seed": args.seed, "device": args.device, "dtype": args.dtype, "overwrite": args.overwrite,
                 "stability": args.stability, "compute_dtype": args.compute_dtype, **_device_overrides(args)}
    if args.gradient_checkpointing or args.calibration:
        overrides["calibration"] = {**file_values.get("calibration", {}),
                                    **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
                                    **({"source": args.calibration} if args.calibration else {})}
    if args.option:
        overrides["method_options"] = {**file_values.get("method_options", {}), **_parse_options(args.option)}
    if args.params_removed is not None or args.allocator or args.no_allocation_cache:
        overrides["allocation"] = {**file_values.get("allocation", {}),
                                   **({"params_removed": args.params_removed}
                                      if args.params_removed is not None else {}),
                                   **({"name": args.allocator} if args.allocator else {}),
                                   **({"cache": False} if args.no_allocation_cache else {})}
    if args.export or args.export_type:
        if not args.export:
            raise UserError("--export-type: give --export gguf too")
        overrides["export"] = {**file_values.get("export", {}), "gguf": args.export_type or "f16"}
    if args.repair:
        overrides["repair"] = {**file_values.get("repair", {}), "name": args.repair}
    if args.recovery:
        overrides["recovery"] = {**file_values.get("recovery", {}), "method": args.recovery}
    if args.no_eval:
        overrides["evaluation"] = {**file_values.get("evaluation", {}), "enabled": False}
    if args.no_eval_cache:
        overrides["evaluation"] = {**overrides.get("evaluation", file_values.get("evaluation", {})), "cache": False}
    config = resolve_config(file_values, overrides)
    try:
        ctx = run(config, on_stage=print_stage)
    except EvaluationFailed as exc:  # the pruned model was saved; show what there is, then fail
        print_run_summary(exc.manifest, exc.output)
        raise
    print_run_summary(ctx.manifest, config.output or Path(f"pruned-{config.method}"))
    if ctx.manifest.get("allocation"):
        from prunekit.allocation.base import describe

        print(describe(ctx.manifest["allocation"]))
        shortfall = budget_shortfall(ctx.manifest["allocation"])
        if shortfall:
            print(f"prunekit: warning: {shortfall}", file=sys.stderr)
    return 0


def print_stage(name: str, seconds: float) -> None:
    """One line per completed stage, so a log (``prunekit run > log.txt 2>&1``) shows where the time went."""
    print(f"stage {name:<15} {seconds:8.1f} s", flush=True)


SHORTFALL = 0.9  # below this share of the budget, the achieved removal is said loudly


def budget_shortfall(allocation: dict) -> str | None:
    """A sentence when the allocator removed clearly less than the budget asked (None otherwise)."""
    budget = (allocation.get("budget") or {}).get("fraction")
    achieved = allocation.get("params_removed_fraction")
    if not isinstance(budget, (int, float)) or not isinstance(achieved, (int, float)) or budget <= 0:
        return None
    if achieved >= SHORTFALL * budget:
        return None
    return (f"the budget asked for {100 * budget:.2f} % of the parameters and allocator "
            f"{allocation.get('allocator')!r} removed only {100 * achieved:.2f} %; the model is saved, but it is "
            f"not the model the budget describes (try --allocator uniform, or a smaller budget)")


def cmd_methods(_: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from prunekit.plugin.registry import get_registry

    table = Table(title="prunekit methods")
    for col in ("method", "provider", "description", "calibration", "options (defaults)"):
        table.add_column(col)
    for name, entry in sorted(get_registry().methods.items()):
        d = entry.describe()
        opts = ", ".join(f"{k}={v}" for k, v in d["options"].items())
        table.add_row(name, d["provider"], d["description"], "yes" if d["needs_calibration"] else "no", opts)
    Console(width=200).print(table)
    return 0


def cmd_plugins(_: argparse.Namespace) -> int:
    from prunekit.plugin.host import get_host
    from prunekit.plugin.registry import describe_plugins

    print(json.dumps(describe_plugins(get_host()), indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prunekit.cli.failures import check_eval_args, write_json_atomically
    from prunekit.core.config import read_config_file, resolve_config, unknown_keys
    from prunekit.eval.report import print_metrics
    from prunekit.eval.suite import eval_spec, evaluate_model
    from prunekit.io.load import load_model

    check_eval_args(args)  # --limit, --json location, `~`: before loading anything
    file_values = read_config_file(args.config) if args.config else {}
    unknown = unknown_keys(file_values)
    if unknown:  # a typo anywhere in the file is refused; a run config's other settings are ignored here
        raise UserError(f"config: {args.config}: unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)} (prunekit eval reads the evaluation section and the "
                        f"device settings of a run config)")
    run_config = resolve_config({"evaluation": file_values.get("evaluation", {}),
                                 **{k: file_values[k] for k in _device_overrides(args) if k in file_values}},
                                _device_overrides(args))
    spec = eval_spec(file_values.get("evaluation", {}))  # eval's defaults: zero-shot on a fair quick sample
    if args.full:
        spec = spec.model_copy(update={"ppl_max_windows": None, "zero_shot_limit": None})
    if args.limit is not None:
        spec = spec.model_copy(update={"zero_shot_limit": args.limit})
    model, tokenizer, source = load_model(args.model, args.dtype, run_config.device, device_map=run_config.device_map,
                                          max_memory=run_config.max_memory, offload_folder=run_config.offload_folder)
    metrics = evaluate_model(model, tokenizer, spec)
    print(f"model: {source}")
    print_metrics({"model": metrics}, title="evaluation", model_hint=args.model)
    if args.json:
        write_json_atomically(args.json, {"model": source, "metrics": metrics})
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from prunekit.core.config import read_config_file, resolve_config
    from prunekit.pipeline.recover import finish_distributed, recover_checkpoint
    from prunekit.runtime.paths import expand_path

    file_values = read_config_file(expand_path(args.config, "--config")) if args.config else {}
    recovery = dict(file_values.get("recovery", {}))
    if args.recovery:
        recovery["method"] = args.recovery
    if args.option:
        recovery["options"] = {**recovery.get("options", {}), **_parse_options(args.option)}
    config = resolve_config({k: file_values[k] for k in ("seed", "dtype", "device", "overwrite") if k in file_values},
                            {"recovery": recovery, "seed": args.seed, "dtype": args.dtype, "device": args.device,
                             "overwrite": args.overwrite})
    try:
        manifest = recover_checkpoint(args.pruned, args.output, config)
    finally:
        finish_distributed()
    if manifest is not None:
        info = manifest["recovery"]["info"] or {}
        print(f"recovered {args.pruned} -> {args.output} ({info.get('steps', '?')} steps, loss "
              f"{info.get('loss_first_epoch', float('nan')):.4f} -> {info.get('loss_last_epoch', float('nan')):.4f})")
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    """Hand every argument after ``bench`` to the benchmark harness."""
    try:
        from prunekit.benchmarks.harness import main as bench_main
    except ImportError:
        raise UserError("bench: the benchmarks package is not installed; run from a prunekit checkout "
                        "(pip install -e '.[bench]')") from None
    return bench_main(bench_args)


def cmd_export(args: argparse.Namespace) -> int:
    from prunekit.io.gguf import export_checkpoint
    from prunekit.runtime.paths import expand_path

    path = export_checkpoint(expand_path(args.pruned, "PRUNED_DIR"), expand_path(args.output, "--output"),
                             type=args.type)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


COMMANDS = {"run": cmd_run, "methods": cmd_methods, "plugins": cmd_plugins, "eval": cmd_eval, "recover": cmd_recover,
            "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure becomes one line on stderr and an exit code (see prunekit.cli.failures)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    from prunekit.runtime.quiet import VERBOSE_ENV

    def dispatch() -> int:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        args = _parser().parse_args(argv)
        if args.verbose:
            os.environ.update({DEBUG_ENV: "1", VERBOSE_ENV: "1"})
        return COMMANDS[args.command](args)

    saved = {name: os.environ.get(name) for name in (DEBUG_ENV, VERBOSE_ENV)}
    try:
        return guarded(dispatch)
    finally:  # main() may be called again in this process (tests, notebooks): --verbose does not outlast it
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


if __name__ == "__main__":
    sys.exit(main())
