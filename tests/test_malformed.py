"""Malformed input, table-driven, in process through ``prunekit.cli.commands.main``: every case must end with the
expected exit code, exactly one line on stderr, no traceback, and every input and output location
byte-for-byte as it was (hashes of the shared model folders and of the case's own folder)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from safetensors.torch import load_file, save_file

from prunekit.cli import main

RUN = ["run", "--no-eval", "--ratio", "0.34"]


# ------------------------------------------------------------------------------------- the inputs


def _copy_with(base: Path, dest: Path, change: Callable[[Path], None]) -> Path:
    shutil.copytree(base, dest)
    change(dest)
    return dest


def _edit_config(**values) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(values)
        (d / "config.json").write_text(json.dumps(config))
    return change


def _poison(value: float) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        state = load_file(d / "model.safetensors")
        state["model.layers.2.mlp.up_proj.weight"][3, :5] = value
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return change


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _big_vocabulary(d: Path) -> None:
    """A tokenizer of 200 tokens for a model whose embedding has 96 rows (the words the text uses get ids >= 96)."""
    from conftest import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(120)] + list(dict.fromkeys(WORDS))
    words += [f"x{i}" for i in range(200 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(d)


def _gpt2(d: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=96)).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Models every case reads (never writes): a good tiny one and broken variants of it."""
    root = tmp_path_factory.mktemp("world")
    good = root / "good"
    make_tiny_llama(9, 3, layers=4).save_pretrained(good)
    make_tiny_tokenizer().save_pretrained(good)
    variants = {
        "truncated": _truncate,
        "garbage": lambda d: (d / "model.safetensors").write_bytes(b"\0" * 64),
        "no-weights": lambda d: (d / "model.safetensors").unlink(),
        "bad-json": lambda d: (d / "config.json").write_text("{not json"),
        "no-config": lambda d: (d / "config.json").unlink(),
        "wide-mlp": _edit_config(intermediate_size=64),
        "more-layers": _edit_config(num_hidden_layers=6),
        "fewer-layers": _edit_config(num_hidden_layers=2),
        "unknown-type": _edit_config(model_type="nonsense"),
        "nan": _poison(float("nan")),
        "inf": _poison(float("inf")),
    }
    for name, change in variants.items():
        _copy_with(good, root / name, change)
    _gpt2(root / "gpt2")
    (root / "empty").mkdir()
    tokenizers = {
        "tok-bad-json": lambda d: (d / "tokenizer.json").write_text("{not json"),
        "tok-config-bad-json": lambda d: (d / "tokenizer_config.json").write_text("{not json"),
        "tok-cut": lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:300]),
        "tok-not-utf8": lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe{}"),
        "tok-none": lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        "tok-no-model": lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "X"}}'),
        "tok-too-big": _big_vocabulary,
        "narrow-hidden": _edit_config(hidden_size=80),
    }
    for name, change in tokenizers.items():
        _copy_with(good, root / name, change)
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    (root / "dangling").symlink_to(root / "nowhere")
    return root


def tree_hash(*roots: Path) -> dict[str, str]:
    """Every file (sha256), folder and link under ``roots``: the state a failed run must leave alone."""
    out: dict[str, str] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            key = str(path)
            if path.is_symlink():
                out[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[key] = "dir"
            else:
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# -------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One malformed invocation. ``argv`` may use {model} {world} {tmp} {out} {cfg}; ``files`` are written
    into the case folder first (name -> text or bytes); ``setup`` may prepare more and return a cleanup."""

    id: str
    argv: list[str]
    code: int
    expect: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: Callable | None = None
    cwd: str | None = None
    skip_if_cuda: bool = False  # the case needs a machine without (that) CUDA device


def run_args(*extra: str, method: str = "magnitude", ratio: bool = True) -> list[str]:
    base = RUN if ratio else RUN[:2]
    return [*base, "--method", method, "--model", "{model}", "--output", "{out}", *extra]


def yaml_case(id: str, text: str, expect: str, method: str = "magnitude") -> Case:
    """A YAML config case (no --ratio flag when the file sets the ratio, since flags win)."""
    args = run_args("--config", "{tmp}/c.yaml", method=method, ratio="ratio:" not in text)
    return Case(id, args, 2, expect, {"c.yaml": text})


def toml_case(id: str, text: str, expect: str, method: str = "magnitude") -> Case:
    args = run_args("--config", "{tmp}/c.toml", method=method, ratio="ratio =" not in text)
    return Case(id, args, 2, expect, {"c.toml": text})


def model_case(id: str, variant: str, expect: str) -> Case:
    return Case(id, [*RUN, "--method", "magnitude", "--model", f"{{world}}/{variant}", "--output", "{out}"], 2, expect)


def _prunekit_output(tmp: Path, extra: dict[str, str] | None = None) -> None:
    """A folder that looks like a previous prunekit output (run.json listing its files), plus ``extra``."""
    out = tmp / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "run.json").write_text(json.dumps({"config": {}, "versions": {"prunekit": "0"},
                                              "files": ["config.json"]}))
    for name, text in (extra or {}).items():
        (out / name).write_text(text)


def _hold_lock(tmp: Path, _monkeypatch, _world: Path):
    fd = os.open(tmp / ".out.lock", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    return lambda: os.close(fd)


def _tiny_disk(_tmp: Path, monkeypatch, _world: Path):
    import prunekit.io.safety

    monkeypatch.setattr(prunekit.io.safety.shutil, "disk_usage",
                        lambda _p: shutil._ntuple_diskusage(10**9, 10**9, 4096))


def _enospc_mid_save(_tmp: Path, monkeypatch, _world: Path):
    import prunekit.io.export
    import prunekit.io.safety

    real = prunekit.io.safety.pause_point

    def pause(point: str) -> None:
        if point == "save:mid":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(point)

    monkeypatch.setattr(prunekit.io.safety, "pause_point", pause)


def _symlink_out(tmp: Path, _monkeypatch, _world: Path):
    (tmp / "real").mkdir()
    (tmp / "out").symlink_to(tmp / "real")


def _model_inside_out(tmp: Path, _monkeypatch, world: Path):
    """The issue's data-loss case: the user's model and other files in work/, output work/."""
    shutil.copytree(world / "good", tmp / "work" / "mymodel")
    (tmp / "work" / "notes.txt").write_text("mine")


def _unwritable_out(tmp: Path, monkeypatch, _world: Path):
    """An existing output folder the process may not change (an immutable folder: chattr +i, as root too)."""
    import prunekit.io.safety

    (tmp / "out").mkdir()
    real = os.access
    monkeypatch.setattr(prunekit.io.safety.os, "access",
                        lambda path, mode, **k: False if Path(path) == tmp / "out" else real(path, mode, **k))


def _immutable_at_publish(_tmp: Path, monkeypatch, _world: Path):
    """The output became immutable while the run worked: the final rename is refused (EPERM)."""
    import prunekit.io.safety

    def refuse(scratch, output):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(scratch), None, str(output))

    monkeypatch.setattr(prunekit.io.safety, "publish", refuse)


def _mkdtemp_refused(_tmp: Path, monkeypatch, _world: Path):
    """A read-only file system under the output's parent (EROFS when the scratch folder is made)."""
    import prunekit.io.export

    def refuse(**_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(prunekit.io.export.tempfile, "mkdtemp", refuse)


def _foreign_checkpoint(tmp: Path, world: Path) -> None:
    """A model folder with another tool's run.json."""
    shutil.copytree(world / "good", tmp / "m")
    (tmp / "m" / "run.json").write_text('{"epochs": 3}')


LONG = "n" * 300  # longer than any file system's name limit (255 bytes on Linux)
NEAR = "n" * 250  # fits alone, not with prunekit's scratch suffix (.NAME.partial-XXXXXXXX)

CASES: list[Case] = [
    # ---- flags of `run`
    Case("method-unknown", run_args(method="nope"), 2, "available: "),
    Case("ratio-above-1", run_args("--ratio", "1.5"), 2, "ratio"),
    Case("ratio-zero", run_args("--ratio", "0"), 2, "ratio"),
    Case("ratio-negative", run_args("--ratio", "-0.1"), 2, "ratio"),
    Case("ratio-nan", run_args("--ratio", "nan"), 2, "ratio: Input should be a finite number"),
    Case("ratio-inf", run_args("--ratio", "inf"), 2, "ratio: Input should be a finite number"),
    Case("ratio-text", run_args("--ratio", "half"), 2, "invalid float value"),
    Case("ratio-rounds-to-nothing", run_args("--ratio", "0.01"), 2, "removing nothing"),
    Case("seed-negative", run_args("--seed", "-1"), 2, "seed"),
    Case("seed-huge", run_args("--seed", "99999999999999999999999"), 2, "seed: Input should be less than"),
    Case("seed-float", run_args("--seed", "1.5"), 2, "invalid int value"),
    Case("device-unknown", run_args("--device", "tpu"), 2, "device: Value error, 'tpu' is not a device"),
    Case("device-cuda-index-text", run_args("--device", "cuda:x"), 2, "device: Value error, 'cuda:x' is not a device"),
    Case("device-cuda-index-absent", run_args("--device", "cuda:7"), 2, "device: cuda:7 requested",
         skip_if_cuda=True),
    Case("device-map-unknown-name", run_args("--device-map", "everywhere"), 2, "device_map: Value error, 'everywhere'"),
    Case("device-map-bad-json", run_args("--device-map", "{{model.layers.0: cpu"), 2,
         "device_map: Value error, not valid JSON"),
    Case("device-map-bad-device", run_args("--device-map", '{{"model": "tpu"}}'), 2,
         "module 'model': 'tpu' is not a device"),
    Case("device-map-empty", run_args("--device-map", "{{}}"), 2, "device_map: Value error, must be"),
    Case("device-map-disk-no-folder", run_args("--device-map", '{{"model": "cpu", "lm_head": "disk"}}'), 2,
         "offload_folder: the device map puts modules on 'disk'"),
    Case("device-map-gpu-absent", run_args("--device-map", '{{"model": 0, "lm_head": "cpu"}}'), 2,
         "device_map: cuda:0 requested", skip_if_cuda=True),
    Case("max-memory-no-equals", run_args("--device-map", "auto", "--max-memory", "70GiB"), 2,
         "max_memory: Value error, '70GiB': expected DEVICE=SIZE"),
    Case("max-memory-bad-size", run_args("--device-map", "auto", "--max-memory", "cpu=lots"), 2,
         "max_memory: Value error, cpu: 'lots' is not a size"),
    Case("max-memory-bad-key", run_args("--device-map", "auto", "--max-memory", "gpu0=1GiB"), 2,
         "max_memory: Value error, 'gpu0' is not a device"),
    Case("max-memory-without-map", run_args("--max-memory", "cpu=1GiB"), 2,
         "device_map: --max-memory and --offload-folder"),
    Case("offload-folder-without-map", run_args("--offload-folder", "{tmp}/off"), 2,
         "device_map: --max-memory and --offload-folder"),
    Case("device-map-gradients-offloaded", run_args("--device-map", '{{"model.embed_tokens": "cpu", '
         '"model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "cpu"}}',
         "--offload-folder", "{tmp}/off", method="taylor"), 2, "device_map: method 'taylor' needs gradients",
         {"off/.keep": ""}),
    Case("dtype-unknown", run_args("--dtype", "float8"), 2, "invalid choice"),
    Case("compute-dtype-unknown", run_args("--compute-dtype", "bfloat16"), 2, "invalid choice"),
    Case("flag-unknown", run_args("--ratoi", "0.2"), 2, "unrecognized arguments"),
    Case("no-command", [], 2, "required"),
    Case("command-unknown", ["frobnicate"], 2, "invalid choice"),
    Case("option-no-equals", run_args("-o", "variant"), 2, "expected KEY=VALUE"),
    Case("option-no-key", run_args("-o", "=3"), 2, "expected KEY=VALUE"),
    # ---- plugin options
    Case("taylor-variant", run_args("-o", "variant=third", method="taylor"), 2, "method_options.variant"),
    Case("taylor-variant-list", run_args("-o", "variant=[1]", method="taylor"), 2, "method_options.variant"),
    Case("option-unknown", run_args("-o", "nonsense=1", method="taylor"), 2, "method_options.nonsense"),
    Case("magnitude-p", run_args("-o", "p=3"), 2, "method_options.p"),
    Case("reduction-enum", run_args("-o", "reduction=median"), 2, "method_options.reduction"),
    Case("moreau-step-inf", run_args("-o", "step=Infinity", method="moreau"), 2, "method_options.step"),
    Case("moreau-step-nan", run_args("-o", "step=NaN", method="moreau"), 2, "method_options.step"),
    Case("moreau-iterations-0", run_args("-o", "iterations=0", method="moreau"), 2, "method_options.iterations"),
    Case("moreau-averaged", run_args("-o", "averaged=20", method="moreau"), 2, "averaged"),
    Case("moreau-step-vs-rho", run_args("-o", "step=1", method="moreau-gs-paper"), 2, "rho"),
    # moreau-gs's preset is relative (rho_relative, step_fraction): a user-set absolute field replaces its
    # counterpart, so step=1 is checked against the relative rho once known; setting both is still refused
    Case("moreau-gs-step-vs-relative-rho", run_args("-o", "step=1", method="moreau-gs"), 2,
         "method_options.step: step (1) must be < rho"),
    Case("moreau-gs-rho-and-rho-relative", run_args("-o", "rho=0.1", "-o", "rho_relative=1e-4", method="moreau-gs"),
         2, "set rho or rho_relative, not both"),
    Case("moreau-gs-step-and-step-fraction", run_args("-o", "step=1e-4", "-o", "step_fraction=0.5",
                                                      method="moreau-gs"), 2, "set step or step_fraction, not both"),
    Case("moreau-gs-eta-and-eta-relative", run_args("-o", "eta=1e-6", "-o", "eta_relative=0.1", method="moreau-gs"),
         2, "set eta or eta_relative, not both"),
    Case("moreau-gs-step-fraction-above-1", run_args("-o", "step_fraction=2", method="moreau-gs"), 2,
         "method_options.step_fraction"),
    Case("moreau-gs-reference-mode", run_args("-o", "mode=reference", method="moreau-gs"), 2,
         "need mode 'math'"),
    Case("moreau-penalty", run_args("-o", "penalty=l3", method="moreau"), 2, "method_options.penalty"),
    Case("moreau-seed-huge", run_args("-o", "seed=99999999999999999999999", method="moreau"), 2,
         "method_options.seed"),
    Case("moreau-sigma-negative", run_args("-o", "sigma=-1", method="moreau"), 2, "method_options.sigma"),
    # ---- YAML config files
    yaml_case("yaml-malformed", "ratio: [0.2\n", "malformed"),
    yaml_case("yaml-unknown-key", "ratoi: 0.2\n", "ratoi"),
    yaml_case("yaml-not-mapping", "- 1\n- 2\n", "mapping"),
    Case("yaml-not-utf8", run_args("--config", "{tmp}/c.yaml"), 2, "not UTF-8", {"c.yaml": b"ratio: \xff\xfe 0.2\n"}),
    yaml_case("yaml-layers-outside", "selection:\n  layers: [0, 99]\n", "outside the model"),
    yaml_case("yaml-layers-reversed", "selection:\n  layers: [3, 1]\n", "layers"),
    yaml_case("yaml-layers-negative", "selection:\n  layers: [-1, 2]\n", "layers"),
    yaml_case("yaml-layers-three", "selection:\n  layers: [0, 1, 2]\n", "selection.layers"),
    yaml_case("yaml-scope", "selection:\n  scope: everywhere\n", "selection.scope"),
    yaml_case("yaml-round-to-0", "selection:\n  round_to: 0\n", "selection.round_to"),
    yaml_case("yaml-calib-source", "calibration:\n  source: wikipedia\n", "calibration.source"),
    yaml_case("yaml-calib-samples-0", "calibration:\n  n_samples: 0\n", "calibration.n_samples"),
    yaml_case("yaml-calib-samples-huge", "calibration:\n  n_samples: 1000000000000\n", "calibration.n_samples"),
    yaml_case("yaml-calib-seq-1", "calibration:\n  seq_len: 1\n", "calibration.seq_len"),
    yaml_case("yaml-calib-longer-than-context", "calibration:\n  seq_len: 100000\n", "longer than the model's context",
              method="taylor"),
    yaml_case("yaml-calib-batch-0", "calibration:\n  batch_size: 0\n", "calibration.batch_size"),
    yaml_case("yaml-calib-seed-negative", "calibration:\n  seed: -5\n", "calibration.seed"),
    yaml_case("yaml-calib-offline-hub", "calibration:\n  source: c4\n", "not available offline", method="taylor"),
    yaml_case("yaml-attention-unit", "grouper:\n  attention_unit: rows\n", "grouper.options.attention_unit"),
    yaml_case("yaml-prune-bool", "grouper:\n  prune_attention: maybe\n", "grouper.options.prune_attention"),
    yaml_case("yaml-prune-nothing", "grouper:\n  prune_attention: false\n  prune_mlp: false\n", "nothing to prune"),
    yaml_case("yaml-recovery-unknown", "recovery:\n  method: qlora\n", "recovery: unknown name 'qlora'"),
    yaml_case("yaml-lora-rank-0", "recovery:\n  method: lora\n  options: {r: 0}\n", "recovery.options.r"),
    yaml_case("yaml-lora-lr-inf", "recovery:\n  method: lora\n  options: {lr: .inf}\n", "recovery.options.lr"),
    yaml_case("yaml-lora-seed-negative", "recovery:\n  method: lora\n  options: {seed: -1}\n",
              "recovery.options.seed"),
    yaml_case("yaml-lora-offline-hub", "recovery:\n  method: lora\n  options: {source: alpaca-cleaned}\n",
              "recovery.options.source: data source 'alpaca-cleaned' is not available offline"),
    yaml_case("yaml-calib-mixture-offline-hub", "calibration:\n  source: pd-books+c4\n",
              "calibration.source: data source 'c4' is not available offline", method="taylor"),
    yaml_case("yaml-calib-wikitext-train-offline", "calibration:\n  source: wikitext2\n",
              "calibration.source: data source 'wikitext2' is not available offline", method="taylor"),
    yaml_case("yaml-lora-source", "recovery:\n  method: lora\n  options: {source: nowhere}\n",
              "recovery.options.source"),
    yaml_case("yaml-lora-fsdp-word", "recovery:\n  method: lora\n  options: {fsdp: sideways}\n",
              "recovery.options.fsdp"),
    yaml_case("yaml-lora-fsdp-config-alone", "recovery:\n  method: lora\n  options: {fsdp_config: {version: 2}}\n",
              "fsdp_config needs fsdp: true"),
    yaml_case("yaml-lora-fsdp-config-missing",
              "recovery:\n  method: lora\n  options: {fsdp: true, fsdp_config: /no/f.json}\n",
              "recovery.options.fsdp_config"),
    yaml_case("yaml-lora-deepspeed-missing",
              "recovery:\n  method: lora\n  options: {deepspeed: /nonexistent/z3.json}\n",
              "recovery.options.deepspeed"),
    yaml_case("yaml-lora-per-device-0", "recovery:\n  method: lora\n  options: {per_device_batch_size: 0}\n",
              "recovery.options.per_device_batch_size"),
    yaml_case("yaml-lora-accumulation-0", "recovery:\n  method: lora\n  options: {gradient_accumulation_steps: 0}\n",
              "recovery.options.gradient_accumulation_steps"),
    yaml_case("yaml-lora-checkpointing-text",
              "recovery:\n  method: lora\n  options: {gradient_checkpointing: sometimes}\n",
              "recovery.options.gradient_checkpointing"),
    # ---- `recover` (a pruned checkpoint; every case fails before loading it)
    Case("recover-no-output", ["recover", "{model}"], 2, "--output"),
    Case("recover-missing-dir", ["recover", "{tmp}/nope", "--output", "{out}"], 2, "not a directory"),
    Case("recover-output-inside-input", ["recover", "{model}", "--output", "{model}/sub"], 2, "inside the input model"),
    Case("recover-bad-option", ["recover", "{model}", "--output", "{out}", "-o", "fsdp=sideways"], 2,
         "recovery.options.fsdp"),
    Case("recover-unknown-trainer", ["recover", "{model}", "--output", "{out}", "--recovery", "qlora"], 2,
         "recovery: unknown name 'qlora'"),
    Case("recover-dtype", ["recover", "{model}", "--output", "{out}", "--dtype", "float8"], 2, "invalid choice"),
    Case("recover-seed-negative", ["recover", "{model}", "--output", "{out}", "--seed", "-1"], 2, "seed"),
    yaml_case("yaml-eval-corpus", "evaluation:\n  perplexity: [imdb]\n", "evaluation.perplexity"),
    yaml_case("yaml-alloc-search-steps", "allocation:\n  name: measured\n  options: {search_steps: -1}\n",
              "allocation.options.search_steps"),
    yaml_case("yaml-alloc-search-step", "allocation:\n  name: measured\n  options: {search_step: 1.5}\n",
              "allocation.options.search_step"),
    yaml_case("yaml-alloc-search-samples", "allocation:\n  name: measured\n  options: {search_samples: 0}\n",
              "allocation.options.search_samples"),
    yaml_case("yaml-eval-task", "evaluation:\n  zero_shot: [mmlu]\n", "evaluation.zero_shot"),
    yaml_case("yaml-eval-window-1", "evaluation:\n  ppl_window: 1\n", "evaluation.ppl_window"),
    yaml_case("yaml-eval-split", "evaluation:\n  ppl_split: dev2\n", "evaluation.ppl_split"),
    Case("yaml-eval-window-longer-than-context", [*RUN[:1], "--method", "magnitude", "--model", "{model}", "--output",
         "{out}", "--config", "{tmp}/c.yaml"], 2, "evaluation.ppl_window: 4096 is longer",
         {"c.yaml": "evaluation:\n  ppl_window: 4096\n  zero_shot: []\n"}),
    Case("yaml-eval-unknown-evaluator", ["run", "--method", "magnitude", "--model", "{model}", "--output", "{out}",
         "--config", "{tmp}/c.yaml"], 2, "evaluators: unknown name 'nope'",
         {"c.yaml": "evaluation:\n  evaluators:\n    nope: {}\n"}),
    Case("yaml-eval-data-dir-missing", ["run", "--method", "magnitude", "--model", "{model}", "--output", "{out}",
         "--config", "{tmp}/c.yaml"], 2, "does not exist",
         {"c.yaml": "evaluation:\n  perplexity: [wikitext2]\n  zero_shot: []\n  data_dir: /nonexistent/wt2\n"}),
    yaml_case("yaml-ratio-text", "ratio: a lot\n", "ratio"),
    yaml_case("yaml-ratio-nan", "ratio: .nan\n", "ratio: Input should be a finite number"),
    yaml_case("yaml-seed-float", "seed: 1.0e+30\n", "seed"),
    yaml_case("yaml-dtype", "dtype: float64\n", "dtype"),
    yaml_case("yaml-compute-dtype", "compute_dtype: half\n", "compute_dtype"),
    yaml_case("yaml-compute-dtype-list", "compute_dtype: [float32]\n", "compute_dtype"),
    yaml_case("yaml-device", "device: gpu\n", "device"),
    yaml_case("yaml-device-map-list", "device_map: [cpu, disk]\n", "device_map"),
    yaml_case("yaml-max-memory-negative", "device_map: auto\nmax_memory: {cpu: -5}\n", "max_memory"),
    yaml_case("yaml-gradient-checkpointing-text", "calibration:\n  gradient_checkpointing: maybe\n",
              "calibration.gradient_checkpointing"),
    yaml_case("yaml-method-options-list", "method_options: [1, 2]\n", "method_options"),
    yaml_case("yaml-overwrite-text", "overwrite: sometimes\n", "overwrite"),
    Case("yaml-output-unknown-user", [*RUN, "--method", "magnitude", "--model", "{model}", "--config", "{tmp}/c.yaml"],
         2, "no such user", {"c.yaml": "output: ~nosuchuser-prunekit/out\n"}),
    Case("config-suffix", run_args("--config", "{tmp}/c.json"), 2, "must end in", {"c.json": "{}"}),
    Case("config-missing", run_args("--config", "{tmp}/missing.yaml"), 2, "file not found"),
    Case("config-is-folder", run_args("--config", "{tmp}/sub.yaml"), 2, "file not found", {"sub.yaml/x": "1"}),
    Case("config-unknown-user", run_args("--config", "~nosuchuser-prunekit/c.yaml"), 2, "no such user"),
    # ---- TOML config files
    toml_case("toml-malformed", "ratio = [0.2\n", "malformed"),
    toml_case("toml-unknown-key", "ratoi = 0.2\n", "ratoi"),
    toml_case("toml-layers-text", "[selection]\nlayers = \"all\"\n", "selection.layers"),
    toml_case("toml-ratio-inf", "ratio = inf\n", "ratio: Input should be a finite number"),
    toml_case("toml-ratio-nan", "ratio = nan\n", "ratio: Input should be a finite number"),
    toml_case("toml-source-number", "[calibration]\nsource = 3\n", "calibration.source"),
    toml_case("toml-seed-negative", "seed = -1\n", "seed"),
    toml_case("toml-unknown-section", "[pruning]\nratio = 0.2\n", "pruning"),
    toml_case("toml-options-table", "[method_options]\np = 5\n", "method_options.p"),
    # ---- numbers and flags are written as such: a quoted number is refused, not converted
    toml_case("toml-ratio-quoted", 'ratio = "0.3"\n', "ratio: Value error, expected a number, not the text '0.3'"),
    toml_case("toml-seed-quoted", 'seed = "7"\n', "seed: Value error, expected a number, not the text '7'"),
    toml_case("toml-overwrite-quoted", 'overwrite = "true"\n', "overwrite: Value error, expected true or false"),
    toml_case("toml-calib-samples-quoted", '[calibration]\nn_samples = "10"\n', "calibration.n_samples: Value error"),
    toml_case("toml-layers-quoted", '[selection]\nlayers = ["0", "4"]\n', "selection.layers: Value error, expected "
              "numbers, not the text '0'"),
    toml_case("toml-budget-quoted", '[allocation]\nparams_removed = "0.2"\n', "allocation.params_removed: Value"),
    toml_case("toml-eval-windows-quoted", '[evaluation]\nppl_max_windows = "40"\n',
              "evaluation.ppl_max_windows: Value error"),
    yaml_case("yaml-ratio-quoted", 'ratio: "0.3"\n', "ratio: Value error, expected a number"),
    yaml_case("yaml-method-option-quoted", 'method_options:\n  p: "2"\n', "method_options.p: expected a number"),
    yaml_case("yaml-allocator-option-quoted", 'allocation:\n  name: measured\n  options: {search_steps: "4"}\n',
              "allocation.options.search_steps: expected a number"),
    yaml_case("yaml-lora-option-quoted", 'recovery:\n  method: lora\n  options: {r: "8"}\n',
              "recovery.options.r: expected a number"),
    # ---- model paths and broken models
    model_case("model-missing", "does-not-exist", "does-not-exist: no such directory"),
    model_case("model-is-file", "good/config.json", "config.json is a file, expected a model folder"),
    model_case("model-empty-dir", "empty", "has no config.json, so it is not a saved model folder (it is empty)"),
    model_case("model-symlink-loop", "loop-a", "loop-a: symbolic link loop"),
    model_case("model-dangling-symlink", "dangling", "dangling is a symbolic link to"),
    Case("model-empty-string", [*RUN, "--model", "", "--output", "{out}"], 2, "model: empty; give a model folder"),
    Case("model-relative-missing", [*RUN, "--model", "./nope/model", "--output", "{out}"], 2,
         "./nope/model: no such directory"),
    Case("model-hub-id-offline", [*RUN, "--model", "no-such-org/no-such-model", "--output", "{out}"], 2,
         "is not a local folder (no such directory) and not in the hub cache"),
    model_case("tokenizer-bad-json", "tok-bad-json", "tok-bad-json/tokenizer.json is not valid JSON (Expecting"),
    model_case("tokenizer-config-bad-json", "tok-config-bad-json", "tokenizer_config.json is not valid JSON"),
    model_case("tokenizer-cut-short", "tok-cut", "tok-cut/tokenizer.json is not valid JSON (Unterminated string"),
    model_case("tokenizer-not-utf8", "tok-not-utf8", "tok-not-utf8/tokenizer.json is not UTF-8 text"),
    model_case("tokenizer-absent", "tok-none", "has no tokenizer (none of tokenizer.json"),
    model_case("tokenizer-incomplete", "tok-no-model", "cannot load the tokenizer of"),
    model_case("tokenizer-larger-than-embedding", "tok-too-big",
               "has 200 tokens but the model's input embedding has 96 rows"),
    model_case("model-config-hidden-not-divisible", "narrow-hidden",
               "The hidden size (80) is not a multiple of the number of attention heads (9)"),
    model_case("model-truncated", "truncated", "cannot load"),
    model_case("model-garbage-weights", "garbage", "cannot load"),
    model_case("model-no-weights", "no-weights", "cannot load"),
    model_case("model-bad-config-json", "bad-json", "cannot load"),
    model_case("model-no-config", "no-config", "no-config has no config.json, so it is not a saved model folder"),
    model_case("model-config-wider-mlp", "wide-mlp", "wrong shape model.layers.0.mlp.down_proj.weight: saved [72, 48], "
                                                      "config.json makes [72, 64]"),
    model_case("model-config-more-layers", "more-layers", "does not match the weights (missing"),
    model_case("model-config-fewer-layers", "fewer-layers", "does not match the weights (unexpected"),
    model_case("model-unknown-type", "unknown-type", "cannot load"),
    model_case("model-nan-weights", "nan", "model.layers.2.mlp.up_proj.weight holds 5 NaN"),
    model_case("model-inf-weights", "inf", "model.layers.2.mlp.up_proj.weight holds 0 NaN and 5 Inf"),
    model_case("model-unsupported-arch", "gpt2", "unsupported architecture 'gpt2'"),
    Case("model-unknown-user", [*RUN, "--model", "~nosuchuser-prunekit/m", "--output", "{out}"], 2, "no such user"),
    # ---- output locations
    Case("output-is-model", [*RUN, "--model", "{model}", "--output", "{model}"], 2, "is the input model"),
    Case("output-inside-model", [*RUN, "--model", "{model}", "--output", "{model}/pruned"], 2, "lies inside the input"),
    Case("output-contains-model-overwrite", [*RUN, "--model", "{tmp}/work/mymodel", "--output", "{tmp}/work",
         "--overwrite"], 2, "contains the input model", setup=_model_inside_out),
    Case("output-contains-model", [*RUN, "--model", "{tmp}/work/mymodel", "--output", "{tmp}/work"], 2,
         "contains the input model", setup=_model_inside_out),
    Case("output-cwd-overwrite", [*RUN, "--model", "{model}", "--output", ".", "--overwrite"], 2, "current directory",
         {"cwd/notes.txt": "mine"}, cwd="cwd"),
    Case("output-cwd-parent", [*RUN, "--model", "{model}", "--output", "..", "--overwrite"], 2, "current directory",
         {"cwd/notes.txt": "mine"}, cwd="cwd"),
    Case("output-empty-string", [*RUN, "--model", "{model}", "--output", ""], 2, "current directory",
         {"cwd/notes.txt": "mine"}, cwd="cwd"),
    Case("output-is-file", run_args(), 2, "not a directory", {"out": "a file"}),
    Case("output-under-file", [*RUN, "--model", "{model}", "--output", "{tmp}/f/sub"], 2, "is a file", {"f": "x"}),
    Case("output-nonempty", run_args(), 2, "pass --overwrite", {"out/notes.txt": "mine"}),
    Case("output-foreign-overwrite", run_args("--overwrite"), 2, "no prunekit run.json", {"out/notes.txt": "mine"}),
    Case("output-bad-runjson-overwrite", run_args("--overwrite"), 2, "no prunekit run.json",
         {"out/run.json": "{not json", "out/model.safetensors": "x"}),
    Case("output-prunekit-plus-user-file", run_args("--overwrite"), 2, "did not write (notes.txt)",
         setup=lambda tmp, _m, _w: _prunekit_output(tmp, {"notes.txt": "mine"})),
    Case("output-symlink", run_args("--overwrite"), 2, "symbolic link", setup=_symlink_out),
    Case("output-locked", run_args(), 2, "another prunekit run (pid 4242)", setup=_hold_lock),
    Case("output-disk-full-early", run_args(), 1, "not enough disk space", setup=_tiny_disk),
    Case("output-enospc-mid-save", run_args(), 1, "No space left on device", setup=_enospc_mid_save),
    Case("output-name-too-long", [*RUN, "--model", "{model}", "--output", f"{{tmp}}/{LONG}"], 2,
         "is 300 bytes long; the file system allows 255"),
    Case("output-name-too-long-with-scratch", [*RUN, "--model", "{model}", "--output", f"{{tmp}}/{NEAR}"], 2,
         "so use a name of at most 237 bytes"),
    Case("output-parent-name-too-long", [*RUN, "--model", "{model}", "--output", f"{{tmp}}/{LONG}/out"], 2,
         "File name too long; use a shorter name"),
    Case("output-unwritable", run_args(), 2, "cannot be replaced: it is not writable", setup=_unwritable_out),
    Case("output-immutable-at-publish", run_args(), 2, "Operation not permitted); nothing was saved",
         setup=_immutable_at_publish),
    Case("output-read-only-fs", run_args(), 2, "Read-only file system); nothing was saved", setup=_mkdtemp_refused),
    Case("eval-json-name-too-long", ["eval", "--model", "{model}", "--json", f"{{tmp}}/{LONG}.json"], 2,
         "File name too long; use a shorter name"),
    Case("config-name-too-long", run_args("--config", f"{{tmp}}/{LONG}.yaml"), 2, "File name too long"),
    # ---- a parameter budget no allocator can approach (at most 61 % of the tiny model's parameters can go)
    Case("params-removed-beyond-reach", run_args("--params-removed", "0.99", ratio=False), 2,
         "allocation.params_removed: 0.99 (--params-removed) asks for 99.00 % of the parameters, but at most"),
    Case("params-removed-beyond-reach-uniform", run_args("--params-removed", "0.9", "--allocator", "uniform",
                                                          ratio=False), 2, "accepted: <= 0.6"),
    # ---- `recover` on a model prunekit never pruned
    Case("recover-never-pruned", ["recover", "{model}", "--output", "{out}"], 2,
         "is not a model prunekit pruned (no run.json); prune it first"),
    Case("recover-foreign-runjson", ["recover", "{tmp}/m", "--output", "{out}"], 2,
         "its run.json is not prunekit's", setup=lambda tmp, _m, world: _foreign_checkpoint(tmp, world)),
    # ---- `prunekit eval --config`: a typo anywhere in the file is refused
    Case("eval-config-unknown-key", ["eval", "--model", "{model}", "--config", "{tmp}/c.yaml"], 2,
         "unknown key 'ratoi'", {"c.yaml": "ratoi: 0.2\nevaluation:\n  zero_shot: []\n"}),
    Case("eval-config-unknown-nested-key", ["eval", "--model", "{model}", "--config", "{tmp}/c.toml"], 2,
         "unknown keys 'calibration.n_sampels', 'evaluation.perplexty'",
         {"c.toml": "[calibration]\nn_sampels = 3\n[evaluation]\nperplexty = []\n"}),
    # ---- `prunekit eval`
    Case("eval-limit-0", ["eval", "--model", "{model}", "--limit", "0"], 2, "--limit: 0"),
    Case("eval-limit-negative", ["eval", "--model", "{model}", "--limit", "-3"], 2, "--limit: -3"),
    Case("eval-limit-and-full", ["eval", "--model", "{model}", "--limit", "5", "--full"], 2, "--full"),
    Case("eval-json-missing-folder", ["eval", "--model", "{model}", "--json", "{tmp}/no/such/m.json"], 2,
         "does not exist"),
    Case("eval-json-is-folder", ["eval", "--model", "{model}", "--json", "{tmp}/d"], 2, "is a directory", {"d/x": "1"}),
    Case("eval-dtype", ["eval", "--model", "{model}", "--dtype", "float8"], 2, "invalid choice"),
    Case("eval-bad-config", ["eval", "--model", "{model}", "--config", "{tmp}/c.yaml"], 2, "malformed",
         {"c.yaml": "evaluation: [\n"}),
    Case("eval-config-window", ["eval", "--model", "{model}", "--config", "{tmp}/c.yaml"], 2, "evaluation.ppl_window",
         {"c.yaml": "evaluation:\n  ppl_window: 1\n"}),
    Case("eval-model-missing", ["eval", "--model", "{world}/does-not-exist"], 2, "does-not-exist: no such directory"),
    Case("eval-model-nan", ["eval", "--model", "{world}/nan"], 2, "NaN"),
    Case("eval-device-unknown", ["eval", "--model", "{model}", "--device", "npu"], 2,
         "device: Value error, 'npu' is not a device"),
    Case("eval-device-map-bad", ["eval", "--model", "{model}", "--device-map", "[1]"], 2, "device_map: Value error"),
    Case("eval-disk-no-folder", ["eval", "--model", "{model}", "--device-map", '{{"model": "disk", "lm_head": "cpu"}}'],
         2, "offload_folder: the device map puts modules on 'disk'"),
    Case("eval-flag-unknown", ["eval", "--bogus"], 2, "unrecognized arguments"),
    Case("eval-limit-text", ["eval", "--limit", "many"], 2, "invalid int value"),
]


def _write_files(tmp: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def test_there_are_at_least_80_cases():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input(case: Case, world: Path, tmp_path: Path, monkeypatch, capsys):
    if case.skip_if_cuda and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _write_files(tmp_path, case.files)
    cleanup = case.setup(tmp_path, monkeypatch, world) if case.setup else None
    if case.cwd:
        monkeypatch.chdir(tmp_path / case.cwd)
    values = {"model": str(world / "good"), "world": str(world), "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    argv = [a.format(**values) for a in case.argv]
    before = tree_hash(world, tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        if cleanup:
            cleanup()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and case.expect in lines[0], err
    assert tree_hash(world, tmp_path) == before  # inputs byte-identical, no output, no lock, no scratch


def test_device_cuda_without_cuda(world: Path, tmp_path: Path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main([*RUN, "--model", str(world / "good"), "--output", str(tmp_path / "out"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cuda requested" in err
    assert not (tmp_path / "out").exists()
