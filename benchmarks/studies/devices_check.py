"""Device check: prunekit's loading, scoring, pruning, evaluation and saving on a GPU (or the CPU) through accelerate.

Random-weight LLaMA-shaped models only (no download). For each placement — one device (``cuda``/``cuda:0``),
accelerate-dispatched with hooks, a device map that offloads half the model (to CPU on a GPU machine, to disk
on a CPU one), ``device_map="auto"`` with and without a tight ``max_memory`` — it reports whether the mask
equals the single-device mask, the pruned logits' largest difference, perplexity, the save → reload round
trip, and (``--device cuda``) the peak GPU memory of Taylor scoring with and without gradient checkpointing.
Prints one JSON object (and writes it to ``--out``). A failed check is recorded, the others still run::

    python benchmarks/studies/devices_check.py --device cuda --out devices.json   # about a minute on one H200
    python benchmarks/studies/devices_check.py --device cpu                       # the same code path on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from prunekit import api
from prunekit.runtime.devices import input_device, is_dispatched, offloaded

VOCAB = 96
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will can more them some its").split()


def tiny_tokenizer():
    """A word-level tokenizer whose ids fit the tiny model's vocabulary (offline, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + list(dict.fromkeys(WORDS))
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:VOCAB])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def llama(hidden: int, layers: int, n_q: int, n_kv: int, intermediate: int, vocab: int, device: str = "cpu",
          spread: bool = True):
    """A random-weight LlamaForCausalLM built on ``device`` (weights spread so methods disagree)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=n_q, num_key_value_heads=n_kv,
                         head_dim=hidden // n_q, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    if spread:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(torch.empty_like(p).uniform_(0.2, 3.0))
    return model


def batches() -> list[torch.Tensor]:
    return list(torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7)).split(2))


def logits(model) -> torch.Tensor:
    probe = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return model(input_ids=probe.to(input_device(model)), use_cache=False).logits.float().cpu()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def placement_of(model) -> dict[str, Any]:
    devices = sorted({str(p.device) for p in model.parameters()})
    return {"param_devices": devices, "dispatched": is_dispatched(model), "offloaded_modules": len(offloaded(model)),
            "input_device": str(input_device(model))}


def hooked(model, device: str):
    """``model`` dispatched by accelerate over a per-layer map (hooks on every module), all on ``device``."""
    from accelerate import dispatch_model

    target = int(device.partition(":")[2] or 0) if device.startswith("cuda") else device
    device_map = {"model.embed_tokens": target, "model.rotary_emb": target, "model.norm": target, "lm_head": target,
                  **{f"model.layers.{i}": target for i in range(len(model.model.layers))}}
    return dispatch_model(model, device_map=device_map, force_hooks=True)


# ------------------------------------------------------------------------------------ checks


def check_single_and_hooked(ctx: dict) -> dict:
    """Taylor (forward + backward) on one device, by both device spellings, and dispatched with hooks."""
    out: dict[str, Any] = {}
    ref, tok, _ = api.load_model(ctx["dir"], device=ctx["device"])
    want = api.prune(ref, tok, "taylor", 0.34, batches=batches())
    out["single"] = {**placement_of(ref), "params_removed": want.reduction["params_removed_fraction"]}
    if ctx["device"].startswith("cuda"):
        plain, _, _ = api.load_model(ctx["dir"], device="cuda")
        got = api.prune(plain, tok, "taylor", 0.34, batches=batches())
        out["device_cuda_string"] = {"mask_equal": got.mask == want.mask,
                                     "logits_max_diff": max_diff(logits(plain), logits(ref))}
    model = hooked(api.load_model(ctx["dir"], device=ctx["device"])[0], ctx["device"])
    got = api.prune(model, tok, "taylor", 0.34, batches=batches())
    out["hooked"] = {**placement_of(model), "mask_equal": got.mask == want.mask,
                     "logits_max_diff": max_diff(logits(model), logits(ref)),
                     "hooks_kept": hasattr(model.model.layers[1].mlp.down_proj, "_hf_hook")}
    ctx["taylor_mask"], ctx["ref_logits_taylor"] = want.mask, logits(ref)
    return out


def check_offload(ctx: dict) -> dict:
    """Half the layers offloaded (CPU on a GPU machine, disk on a CPU one): magnitude mask, logits, perplexity,
    taylor refused (or run, when nothing is offloaded), save -> reload."""
    from prunekit.eval.perplexity import perplexity

    dev, far = ctx["device"], ("cpu" if ctx["device"].startswith("cuda") else "disk")
    near = int(dev.partition(":")[2] or 0) if dev.startswith("cuda") else dev
    device_map = {"model.embed_tokens": near, "model.rotary_emb": near, "model.layers.0": near,
                  "model.layers.1": near, "model.layers.2": far, "model.layers.3": far, "model.norm": far,
                  "lm_head": far}
    ref, tok, _ = api.load_model(ctx["dir"], device=dev)
    split, _, _ = api.load_model(ctx["dir"], device_map=device_map, offload_folder=ctx["tmp"] / "offload")
    out: dict[str, Any] = {"device_map": device_map, **placement_of(split),
                           "dense_logits_max_diff": max_diff(logits(split), logits(ref))}
    ppl_ref = perplexity(ref, tok, "wikitext2", window=32, batch_size=4, max_windows=8, progress=False)["ppl"]
    ppl_split = perplexity(split, tok, "wikitext2", window=32, batch_size=4, max_windows=8, progress=False)["ppl"]
    out["perplexity"] = {"single": ppl_ref, "split": ppl_split}
    try:
        taylor = api.prune(api.load_model(ctx["dir"], device_map=device_map,
                                          offload_folder=ctx["tmp"] / "offload-t")[0], tok, "taylor", 0.34,
                           batches=batches())
        out["taylor"] = {"ran": True, "mask_equal": taylor.mask == ctx.get("taylor_mask")}
    except Exception as exc:  # UserError with offload
        out["taylor"] = {"ran": False, "refused": f"{type(exc).__name__}: {exc}"}
    want = api.prune(ref, tok, "magnitude", 0.34, allocation={"name": "uniform"})
    started = time.perf_counter()
    got = api.prune(split, tok, "magnitude", 0.34, allocation={"name": "uniform"})
    out["magnitude"] = {"mask_equal": got.mask == want.mask, "seconds": round(time.perf_counter() - started, 3),
                        "logits_max_diff": max_diff(logits(split), logits(ref)), **placement_of(split)}
    saved = api.save(got, ctx["tmp"] / "pruned-offload")
    reloaded, _, _ = api.load_model(str(saved))
    out["reload_cpu_logits_max_diff"] = max_diff(logits(reloaded), logits(ref))
    out["reload_has_hooks"] = any(hasattr(m, "_hf_hook") for m in reloaded.modules())
    ctx["pruned_dir"] = str(saved)
    return out


def check_auto(ctx: dict) -> dict:
    """device_map=auto (one GPU: all on it), then a max_memory so tight that accelerate offloads."""
    _, tok, _ = api.load_model(ctx["dir"])
    auto, _, _ = api.load_model(ctx["dir"], device_map="auto")
    got = api.prune(auto, tok, "taylor", 0.34, batches=batches())
    out: dict[str, Any] = {"auto": {**placement_of(auto), "hf_device_map_devices": sorted(
        {str(v) for v in getattr(auto, "hf_device_map", {}).values()}), "mask_equal_single": got.mask == ctx.get("taylor_mask")}}
    budget = "0=60KiB,cpu=8GiB" if ctx["device"].startswith("cuda") else "cpu=60KiB"
    try:
        tight, _, _ = api.load_model(ctx["dir"], device_map="auto", max_memory=budget,
                                     offload_folder=ctx["tmp"] / "offload-auto")
        res = api.prune(tight, tok, "magnitude", 0.34)
        out["tight"] = {"max_memory": budget, **placement_of(tight),
                        "hf_device_map_devices": sorted({str(v) for v in getattr(tight, "hf_device_map", {}).values()}),
                        "params_removed": res.reduction["params_removed_fraction"]}
    except Exception as exc:
        out["tight"] = {"max_memory": budget, "error": f"{type(exc).__name__}: {exc}"}
    return out


def check_eval_cli(ctx: dict) -> dict:
    """`prunekit eval --device D` and `--device-map auto` on the pruned checkpoint: same perplexity as on the CPU."""
    from prunekit.cli import main

    if "pruned_dir" not in ctx:  # the offload check failed before saving: prune a checkpoint on one device
        model, tok, _ = api.load_model(ctx["dir"], device=ctx["device"])
        got = api.prune(model, tok, "magnitude", 0.34, allocation={"name": "uniform"})
        ctx["pruned_dir"] = str(api.save(got, ctx["tmp"] / "pruned-single"))
    config = ctx["tmp"] / "eval.yaml"
    config.write_text("evaluation:\n  perplexity: [wikitext2]\n  zero_shot: []\n  ppl_window: 32\n"
                      "  ppl_max_windows: 8\n")
    out = {}
    for name, extra in (("cpu", ["--device", "cpu"]), ("device", ["--device", ctx["device"]]),
                        ("device_map_auto", ["--device-map", "auto"])):
        target = ctx["tmp"] / f"eval-{name}.json"
        started = time.perf_counter()
        code = main(["eval", "--model", ctx["pruned_dir"], "--config", str(config), "--json", str(target), *extra])
        out[name] = {"exit": code, "seconds": round(time.perf_counter() - started, 2),
                     "ppl": json.loads(target.read_text())["metrics"]["perplexity"]["wikitext2"]["ppl"]
                     if code == 0 else None}
    return out


SHAPES = {  # (model shape, calibration sequences x tokens); micro-batches of 4 sequences
    "gpu": (dict(hidden=2048, layers=16, n_q=16, n_kv=4, intermediate=5632, vocab=32000), 8, 1024),
    "small": (dict(hidden=512, layers=8, n_q=8, n_kv=2, intermediate=1408, vocab=8000), 8, 256),
    "tiny": (dict(hidden=128, layers=4, n_q=4, n_kv=2, intermediate=256, vocab=512), 4, 64),
}


def score_peak(shape_name: str, checkpointing: bool, device: str, threads: int) -> dict:
    """In a fresh process: Taylor scoring of a random LLaMA of ``shape_name``; time and peak memory above the
    loaded model (CUDA: max_memory_allocated; CPU: peak RSS), with or without gradient checkpointing."""
    from prunekit.benchmarks.memory import PeakRSS
    from prunekit.runtime.devices import gradient_checkpointing

    torch.set_num_threads(threads)
    shape, n, seq = SHAPES[shape_name]
    model = llama(**shape, device=device, spread=False)
    groups = api.build_groups(model)
    ids = list(torch.randint(0, shape["vocab"], (n, seq), generator=torch.Generator().manual_seed(3)).split(4))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    with PeakRSS() as rss, gradient_checkpointing(model, checkpointing):
        scores, _ = api.score(model, groups, "taylor", ids)
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else rss.delta
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": round(time.perf_counter() - started, 3), "peak_above_model_gib": round(peak / 2**30, 4),
            "peak_over_model_size": round(peak / model_bytes, 3),
            "probe": "cuda max_memory_allocated" if cuda else rss.source, "params": model.num_parameters(),
            "tokens": n * seq, "scores": [s.tolist() for s in scores]}


def check_checkpointing_memory(ctx: dict) -> dict:
    """Peak memory of Taylor scoring above the loaded model, with and without gradient checkpointing, each in
    its own process (one variant's peak never includes the other's)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shape = "gpu" if ctx["device"].startswith("cuda") else ctx.get("cpu_shape", "tiny")
    out: dict[str, Any] = {"shape": shape, "model": SHAPES[shape][0], "micro_batch": 4}
    runs = {}
    for name, on in (("plain", False), ("checkpointed", True)):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs[name] = pool.submit(score_peak, shape, on, ctx["device"], torch.get_num_threads()).result()
    for name, run in runs.items():
        out[name] = {k: v for k, v in run.items() if k != "scores"}
    out["scores_max_rel_diff"] = max(
        float(((torch.tensor(a) - torch.tensor(b)).abs() / torch.tensor(b).abs().clamp_min(1e-12)).max())
        for a, b in zip(runs["plain"]["scores"], runs["checkpointed"]["scores"]))
    return out


CHECKS: dict[str, Callable[[dict], dict]] = {
    "single_and_hooked": check_single_and_hooked,
    "offload": check_offload,
    "auto": check_auto,
    "eval_cli": check_eval_cli,
    "checkpointing_memory": check_checkpointing_memory,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these checks")
    ap.add_argument("--cpu-shape", choices=("tiny", "small"), default="tiny",
                    help="model of the checkpointing-memory check on the CPU (the GPU uses a 0.9B shape)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("devices_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = "cuda:0" if args.device == "cuda" else "cpu"
    result: dict[str, Any] = {"device": device, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                              "checks": {}}
    try:
        import accelerate
        import transformers

        result["transformers"], result["accelerate"] = transformers.__version__, accelerate.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="prunekit-devices-") as tmp:
        model_dir = Path(tmp) / "tiny"
        llama(72, 4, 9, 3, 48, VOCAB).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        ctx = {"dir": str(model_dir), "device": device, "tmp": Path(tmp), "cpu_shape": args.cpu_shape}
        for name, check in CHECKS.items():
            if args.only and name not in args.only:
                continue
            started = time.perf_counter()
            try:
                result["checks"][name] = {"ok": True, **check(ctx)}
            except Exception as exc:  # record and go on: one short GPU lease should report every check
                result["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                          "traceback": traceback.format_exc()[-1500:]}
            result["checks"][name]["wall_s"] = round(time.perf_counter() - started, 2)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
