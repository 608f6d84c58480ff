"""GPU check: prune 7B/8B-shaped random-weight models with prunekit's API and report time and memory per stage.

``python -m prunekit.benchmarks.studies.gpu_check --device cuda --out gpu_check.json`` builds LLaMA-2-7B- and
Llama-3-8B-shaped models with random bf16 weights directly on the GPU (no download), and for each
(shape, method) in its own process runs: groups (``api.build_groups``), random-token calibration batches,
scoring (``api.score``), selection (``api.select``, default ratio), pruning (``api.apply``) and one
short perplexity pass. Every stage records wall time (synchronised), the peak of allocated GPU memory
(and that peak above the stage's start) and the host RSS peak above its start; the scoring stage also
records the dtypes it really computed in. The whole run is one JSON document (stdout and ``--out``),
written after every run so a killed check still leaves what it measured. ``--device cpu --shapes tiny``
is the same code path in seconds (the test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
from importlib import metadata
from typing import Any, Iterator

from prunekit.core.versions import package_versions

MODULE = "prunekit.benchmarks.studies.gpu_check"
HEAVY = ("lm_eval", "datasets")  # absent on the GPU machine: the check must never import them
VERSIONS = ("torch", "transformers", "torch-pruning", "accelerate", "pydantic", "pluggy", "prunekit")


def environment(device: Any) -> dict[str, Any]:
    """Versions, CUDA build and the accelerator's name and memory (when ``device`` is CUDA)."""
    import torch

    env: dict[str, Any] = {"versions": package_versions(VERSIONS), "torch_cuda": torch.version.cuda, "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "device": str(device), "torch_threads": torch.get_num_threads(),
                           "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_count=torch.cuda.device_count())
    return env


class Stages:
    """Times each stage and records its memory peaks into ``record["stages"]``, saving the record after each."""

    def __init__(self, record: dict[str, Any], device: Any, path: str | None):
        self.record, self.device, self.path = record, device, path
        record.setdefault("stages", {})

    def save(self) -> None:
        """Write the record so far (the parent reads it even if this process dies later)."""
        if self.path:
            from prunekit.benchmarks.studies.isolated import write_json

            write_json(self.path, self.record)

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        """Run one stage: synchronised wall time, GPU peak (absolute and above start), host RSS peak above start."""
        import torch

        from prunekit.benchmarks.memory import PeakRSS

        info: dict[str, Any] = {}
        self.record["stages"][name] = info
        self.record["current_stage"] = name
        self.save()
        cuda = self.device.type == "cuda"
        self._sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            start_alloc = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        try:
            with PeakRSS() as rss:
                yield info
                self._sync()
        finally:
            info["seconds"] = round(time.perf_counter() - start, 4)
            info["host_rss_peak_delta_bytes"] = rss.delta
            if cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
                info.update(gpu_peak_allocated_bytes=peak, gpu_peak_above_start_bytes=peak - start_alloc,
                            gpu_allocated_after_bytes=torch.cuda.memory_allocated(self.device),
                            gpu_peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device))
            self.save()
        self.record.pop("current_stage", None)


def random_batches(vocab: int, n: int, seq_len: int, batch_size: int, seed: int) -> list:
    """``n`` sequences of ``seq_len`` uniform random token ids (CPU, seeded), split into batches."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (n, seq_len), generator=gen).split(batch_size))


def run_one(spec: dict[str, Any], path: str | None) -> dict[str, Any]:
    """One (shape, method) in this process: build → groups → calibrate → score → select → prune → perplexity."""
    import torch

    from prunekit import api
    from prunekit.io.load import DTYPES
    from prunekit.benchmarks.studies.probes import DtypeProbe
    from prunekit.benchmarks.studies.shapes import build, model_bytes, shape
    from prunekit.data.sampling import RandomTokenSampler
    from prunekit.eval.perplexity import window_nll

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    record: dict[str, Any] = {"shape": spec["shape"], "method": spec["method"], "spec": spec}
    stage = Stages(record, device, path)
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested but torch sees no CUDA device")
        record["environment"] = environment(device)
        s = shape(spec["shape"])
        record["shape_numbers"] = s.describe()
        dtype = DTYPES[spec["dtype"]]
        with stage("startup"):  # lazy imports and the CUDA context, so "build" times only the model
            from transformers import LlamaForCausalLM  # noqa: F401
            torch.ones(1, device=device).add_(1)
        with stage("build"):
            model = build(s, device, dtype, seed=spec["seed"])
        record.update(params_before=model.num_parameters(), model_bytes_before=model_bytes(model),
                      model_dtype=spec["dtype"])
        with stage("groups") as info:
            groups = api.build_groups(model)
            info.update(groups=len(groups), units=sum(g.n_units for g in groups))
        with stage("calibrate") as info:
            batches = random_batches(s.vocab, spec["n_samples"], spec["seq_len"], spec["batch_size"], spec["seed"])
            info.update(sequences=spec["n_samples"], seq_len=spec["seq_len"], batch_size=spec["batch_size"],
                        tokens=spec["n_samples"] * spec["seq_len"])
        with stage("score") as info, DtypeProbe(model) as probe:
            scores, method_info = api.score(model, groups, spec["method"], batches, seed=spec["seed"],
                                            sampler=RandomTokenSampler.like(batches, s.vocab, spec["seed"]))
        info.update(scoring=probe.result(), scores_finite=bool(all(torch.isfinite(t).all() for t in scores)))
        moreau = method_info.get("moreau")
        if moreau:
            info.update(iterations=moreau.get("iterations"), state_bytes=moreau.get("state_bytes"),
                        scope_elements=moreau.get("scope_elements"))
        record["dtype_after_scoring"] = str(next(model.parameters()).dtype).replace("torch.", "")
        with stage("select") as info:
            kept = api.select(groups, scores, spec["ratio"])
            info.update(ratio=spec["ratio"], kept_units=sum(len(k) for k in kept))
        with stage("prune"):
            api.apply(model, groups, kept)
        record.update(params_after=model.num_parameters(), model_bytes_after=model_bytes(model),
                      params_removed_fraction=round(1 - model.num_parameters() / record["params_before"], 6),
                      dtype_after_pruning=str(next(model.parameters()).dtype).replace("torch.", ""),
                      device_after_pruning=str(next(model.parameters()).device))
        with stage("perplexity") as info, torch.inference_mode():
            windows = random_batches(s.vocab, spec["ppl_windows"], spec["ppl_len"], spec["ppl_windows"],
                                     spec["seed"] + 1)[0]
            nll, tokens = window_nll(model, windows)
            info.update(windows=spec["ppl_windows"], window_len=spec["ppl_len"], tokens=tokens,
                        perplexity=math.exp(nll / tokens) if nll / tokens < 700 else float("inf"))
        record["ok"] = True
    except BaseException as exc:  # recorded, then re-raised so the exit code says it failed
        record["ok"] = False
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        record["traceback"] = traceback.format_exc().splitlines()[-12:]
        if device.type == "cuda" and torch.cuda.is_available():
            record["gpu_peak_allocated_at_error_bytes"] = torch.cuda.max_memory_allocated(device)
        raise
    finally:
        record["heavy_modules_imported"] = sorted(m for m in HEAVY if m in sys.modules)
        stage.save()
    return record


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per run: ok, seconds and GPU peak (GB) of scoring and of the whole run."""
    out = []
    for r in runs:
        st = r.get("stages", {})
        peaks = [s.get("gpu_peak_allocated_bytes", 0) for s in st.values()]
        out.append({"shape": r.get("shape"), "method": r.get("method"), "ok": bool(r.get("ok")),
                    "error": r.get("error"), "score_seconds": st.get("score", {}).get("seconds"),
                    "score_gpu_peak_gb": round(st.get("score", {}).get("gpu_peak_allocated_bytes", 0) / 1e9, 2),
                    "run_gpu_peak_gb": round(max(peaks, default=0) / 1e9, 2),
                    "stages_seconds": round(sum(s.get("seconds", 0) for s in st.values()), 2),
                    "child_seconds": r.get("child_seconds"),
                    "scoring_param_dtypes": st.get("score", {}).get("scoring", {}).get("param_dtypes"),
                    "model_gb": round(r.get("model_bytes_before", 0) / 1e9, 2)})
    return out


def check(specs: list[dict[str, Any]], budget: float, run_timeout: float, out: str | None = None,
          argv: list[str] | None = None) -> dict[str, Any]:
    """Run every spec in its own process, in order, within ``budget`` seconds; the JSON document.

    A run that fails, crashes or times out is recorded with its error and the stages it finished; the
    next one still runs. Runs that would start with under 30 s of the budget left are recorded as skipped.
    """
    from prunekit.benchmarks.studies.isolated import run_child, write_json

    start = time.perf_counter()
    doc: dict[str, Any] = {"check": "prunekit gpu_check", "argv": argv,
                           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "budget_seconds": budget, "runs": []}
    for spec in specs:
        left = budget - (time.perf_counter() - start)
        if left < 30:
            record = {"spec": spec, "error": f"skipped: {left:.0f} s of the {budget:.0f} s budget left"}
        else:
            print(f"gpu_check: {spec['shape']} {spec['method']} (up to {min(run_timeout, left):.0f} s)",
                  file=sys.stderr, flush=True)
            record = run_child(MODULE, spec, min(run_timeout, left))
        record.setdefault("shape", spec["shape"])
        record.setdefault("method", spec["method"])
        record.setdefault("ok", False)
        doc["runs"].append(record)
        if "environment" not in doc and record.get("environment"):
            doc["environment"] = record["environment"]
        doc["total_seconds"] = round(time.perf_counter() - start, 2)
        doc["summary"] = summary(doc["runs"])
        print(f"gpu_check: {json.dumps(doc['summary'][-1])}", file=sys.stderr, flush=True)
        if out:
            write_json(out, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the check and print its JSON document (exit 1 when a run failed)."""
    from prunekit.benchmarks.studies.shapes import SHAPES
    from prunekit.core.config import CalibrationConfig, RunConfig

    cal = CalibrationConfig()
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama-7b,llama3-8b", help=f"comma-separated, of: {', '.join(SHAPES)}")
    p.add_argument("--methods", default="taylor,moreau-gs", help="comma-separated method names (prunekit methods)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--out", help="also write the JSON document here (rewritten after every run)")
    p.add_argument("--ratio", type=float, default=RunConfig.model_fields["ratio"].default)
    p.add_argument("--samples", type=int, default=cal.n_samples, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=cal.seq_len)
    p.add_argument("--batch-size", type=int, default=cal.batch_size)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in each run (0: torch's default)")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds one (shape, method) may take")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check; runs that would "
                   "start with under 30 s left are skipped")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_one(json.loads(args.child), args.record)
        return 0
    shapes = [s for s in args.shapes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        p.error(f"--shapes: {', '.join(unknown) or 'none given'} (accepted: {', '.join(SHAPES)})")
    from prunekit.errors import UserError
    from prunekit.plugin.registry import get_registry

    registry = get_registry()
    try:  # a misspelt method fails here, before any GPU time is spent
        for method in methods or [""]:
            registry.method(method)
    except UserError as exc:
        p.error(f"--methods: {exc}")
    specs = [{"shape": s, "method": m, "device": args.device, "dtype": args.dtype, "ratio": args.ratio,
              "n_samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "ppl_windows": args.ppl_windows, "ppl_len": args.ppl_len, "seed": args.seed, "threads": args.threads}
             for s in shapes for m in methods]
    doc = check(specs, args.budget, args.run_timeout, args.out, sys.argv[1:] if argv is None else argv)
    print(json.dumps(doc, indent=2, default=str))
    return 0 if all(r.get("ok") for r in doc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
