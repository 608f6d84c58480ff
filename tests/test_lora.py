"""LoRA recovery: trains on pruned per-layer shapes, merges back to plain Linear weights, reloads exactly."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, registered_plugin

import prunekit.builtin.lora as lora_module
from prunekit.adapters.grouping import GrouperOptions, apply_plan, build_groups
from prunekit.adapters.llama import LlamaAdapter
from prunekit.builtin.lora import LoraOptions, LoraRecovery, batches, mean_loss
from prunekit.cli import main
from prunekit.core.config import RunConfig
from prunekit.core.select import select
from prunekit.errors import UserError
from prunekit.importance.base import ScoringContext
from prunekit.io.export import load_pruned
from prunekit.plugin.registry import get_registry

TINY = {"max_examples": 8, "cutoff_len": 32, "batch_size": 4, "epochs": 2, "lr": 1e-2, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture
def lora_plugin():
    """Register prunekit.builtin.lora like its entry point would, unless the entry point already did."""
    with registered_plugin(lora_module, "lora"):
        yield


def pruned_tiny(layers: range = range(1, 3)):
    """A tiny GQA 9q/3kv model with half its units removed in ``layers`` only (per-layer shapes)."""
    model = make_tiny_llama(9, 3)
    adapter = LlamaAdapter(model)
    groups = build_groups(model, adapter, layers, GrouperOptions())
    entry = get_registry().method("magnitude")
    scores = entry.cls(entry.options()).scores(ScoringContext(model=model, groups=groups, batches=[], seed=0))
    apply_plan(model, adapter, groups, select(groups, scores, 0.5, "local"))
    adapter.sync_config()
    return model


def test_lora_lowers_loss_keeps_shapes_and_reloads(tmp_path):
    model, tokenizer = pruned_tiny(), make_tiny_tokenizer()
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert len(set(widths)) == 2  # really per-layer shapes
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    recovery = LoraRecovery(LoraOptions(**TINY))
    data = batches(recovery.examples(tokenizer, 0), 4, tokenizer.pad_token_id, list(range(TINY["max_examples"])))
    before = mean_loss(model, data)

    info = recovery.recover(model, tokenizer, RunConfig())

    assert mean_loss(model, data) < before - 0.1
    assert info["loss_last_epoch"] < info["loss_first_epoch"] and info["steps"] == 4
    assert {n: t.shape for n, t in model.state_dict().items()} == shapes  # no lora_ keys, same widths
    assert all(type(m) is torch.nn.Linear for m in model.model.layers[1].modules() if isinstance(m, torch.nn.Linear))
    assert not model.training and next(model.parameters()).dtype == torch.float32
    model.save_pretrained(tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_lora_is_seeded_and_restores_dtype():
    tokenizer, merged = make_tiny_tokenizer(), []
    for _ in range(2):
        model = pruned_tiny().to(torch.bfloat16)
        LoraRecovery(LoraOptions(**{**TINY, "epochs": 1})).recover(model, tokenizer, RunConfig())
        assert next(model.parameters()).dtype == torch.bfloat16
        merged.append(model.state_dict())
    assert all(torch.equal(merged[0][n], merged[1][n]) for n in merged[0])
    untouched = pruned_tiny().to(torch.bfloat16).state_dict()
    assert torch.equal(merged[0]["model.embed_tokens.weight"], untouched["model.embed_tokens.weight"])
    assert not torch.equal(merged[0]["model.layers.1.mlp.down_proj.weight"],
                           untouched["model.layers.1.mlp.down_proj.weight"])


def test_unknown_target_module_is_a_user_error():
    with pytest.raises(UserError, match="target_modules"):
        LoraRecovery(LoraOptions(**{**TINY, "target_modules": ["nope_proj"]})).recover(
            pruned_tiny(), make_tiny_tokenizer(), RunConfig())


def _config(path, recovery: str):
    path.write_text("selection:\n  layers: [1, 3]\ncalibration:\n  n_samples: 2\n  seq_len: 16\n" + recovery)
    return str(path)


def test_prunekit_run_with_lora_recovery(lora_plugin, tiny_model_dir, tmp_path):
    options = json.dumps(TINY)
    run = ["run", "--no-eval", "--method", "magnitude", "--ratio", "0.34", "--model", str(tiny_model_dir)]
    assert main([*run, "--output", str(tmp_path / "plain"), "--config", _config(tmp_path / "a.yaml", "")]) == 0
    recovered = _config(tmp_path / "b.yaml", f"recovery:\n  method: lora\n  options: {options}\n")
    assert main([*run, "--output", str(tmp_path / "lora"), "--config", recovered]) == 0

    manifest = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert "recover" in manifest["timings"] and manifest["config"]["recovery"]["method"] == "lora"
    plain, tuned = load_pruned(tmp_path / "plain").state_dict(), load_pruned(tmp_path / "lora").state_dict()
    assert {n: t.shape for n, t in plain.items()} == {n: t.shape for n, t in tuned.items()}
    assert torch.equal(plain["model.norm.weight"], tuned["model.norm.weight"])
    assert not torch.equal(plain["model.layers.2.self_attn.o_proj.weight"],
                           tuned["model.layers.2.self_attn.o_proj.weight"])


def test_bad_recovery_option_exits_2(lora_plugin, tiny_model_dir, tmp_path, capsys):
    for options, field in (("{rank: 8}", "recovery.options.rank"), ("{source: imdb}", "recovery.options.source")):
        config = _config(tmp_path / "c.yaml", f"recovery:\n  method: lora\n  options: {options}\n")
        assert main(["run", "--no-eval", "--method", "magnitude", "--model", str(tiny_model_dir),
                     "--output", str(tmp_path / "o"), "--config", config]) == 2
        assert field in capsys.readouterr().err
        assert not (tmp_path / "o").exists()



def _dtype_probe():
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.seen: list[tuple[set, set, int]] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
            adapters = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
            float32 = sum(p.numel() for n, p in model.named_parameters()
                          if "lora_" not in n and p.dtype == torch.float32)
            self.seen.append((base, adapters, float32))

    return Probe()


def test_bf16_model_trains_without_a_float32_copy():
    model, tokenizer = pruned_tiny().to(torch.bfloat16), make_tiny_tokenizer()
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    recovery = LoraRecovery(LoraOptions(**TINY))
    probe = _dtype_probe()
    recovery.callbacks.append(probe)
    outputs = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))

    rng = torch.get_rng_state(), random.getstate()
    info = recovery.recover(model, tokenizer, RunConfig())
    hook.remove()
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]  # caller's RNG untouched

    assert len(probe.seen) == info["steps"] == 4
    assert all(base == {torch.bfloat16} and adapters == {torch.float32} and f32 == 0
               for base, adapters, f32 in probe.seen)
    assert outputs and set(outputs) == {torch.bfloat16}  # the base matmuls ran in bf16
    assert info["mixed_precision"] == "bf16" and info["loss_last_epoch"] < info["loss_first_epoch"]
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == weights  # merged in place, never re-allocated
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # requires_grad restored
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_accumulation_and_checkpointing_lower_the_loss():
    model, tokenizer = pruned_tiny(), make_tiny_tokenizer()
    options = {**TINY, "per_device_batch_size": 2, "gradient_accumulation_steps": 2, "gradient_checkpointing": True}
    recovery = LoraRecovery(LoraOptions(**options))
    data = batches(recovery.examples(tokenizer, 0), 4, tokenizer.pad_token_id, list(range(TINY["max_examples"])))
    before = mean_loss(model, data)
    info = recovery.recover(model, tokenizer, RunConfig())
    assert info["steps"] == 4  # 8 examples / (2 per pass x 2 passes) x 2 epochs
    assert mean_loss(model, data) < before - 0.1
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # switched off again
    assert model.config.use_cache is True


@pytest.mark.parametrize("options, message", [
    ({"fsdp": "full_shard sideways"}, "'sideways' is not one of true, false, full_shard"),
    ({"fsdp_config": {"version": 2}}, "fsdp_config needs fsdp: true"),
    ({"fsdp": "full_shard", "fsdp_config": "/no/such/fsdp.json"}, "is not a file"),
    ({"deepspeed": "/no/such/zero3.json"}, "is not a file"),
    ({"deepspeed": {"bf16": {"enabled": True}}}, "not a DeepSpeed config"),
    ({"per_device_batch_size": 0}, "greater than or equal to 1"),
    ({"gradient_accumulation_steps": 0}, "greater than or equal to 1"),
    ({"gradient_checkpointing": "sometimes"}, "valid boolean"),
])
def test_scale_options_are_validated(options, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        LoraOptions(**options)


def test_fsdp_and_deepspeed_are_exclusive(tmp_path):
    from pydantic import ValidationError

    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValidationError, match="alternatives|deepspeed package"):
        LoraOptions(fsdp="full_shard", deepspeed=str(config))
    assert LoraOptions(fsdp=["full_shard", "auto_wrap"], fsdp_config={"version": 2}).fsdp == "full_shard auto_wrap"
    assert LoraOptions(fsdp=True, fsdp_config={"version": 2}).fsdp is True and LoraOptions(fsdp="").fsdp is False


@pytest.mark.distributed
def test_module_tree_undoes_fsdp2_sharding(tmp_path):
    """FSDP2 (torch's fully_shard) on two gloo CPU processes: after gathering, ModuleTree gives back plain
    classes and full parameters whose logits equal the sharded model's; peft then merges as usual."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(tests / "fsdp_restore_worker.py"), str(tests)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert result["fsdp_classes"]  # really sharded: FSDP2 swapped the module classes
    assert (result["classes_restored"] and result["merged_in_place"] and result["dtensors_left"] == 0
            and result["lora_left"] == 0)
    assert result["merged_class"] == "LlamaForCausalLM" and result["dtype"] == "torch.bfloat16"
    assert result["restored_vs_sharded"] == 0.0
    assert result["merged_vs_sharded"] < 0.1  # the merge rounds W + BA to bf16 once


def test_fp16_model_never_trains_without_loss_scaling():
    """fp16 gradients must not underflow silently: accelerate scales the loss on GPUs only, so on the CPU
    an fp16 model trains on a float32 copy and is cast back."""
    model, tokenizer = pruned_tiny().to(torch.float16), make_tiny_tokenizer()
    info = LoraRecovery(LoraOptions(**TINY)).recover(model, tokenizer, RunConfig())
    assert info["mixed_precision"] == "no (float32 copy: fp16 on the CPU)" and info["loss_scaling"] is False
    assert info["loss_last_epoch"] < info["loss_first_epoch"]
    assert all(p.dtype == torch.float16 for p in model.parameters())
    args = LoraRecovery(LoraOptions(**TINY)).arguments("/nonexistent", 0, torch.float16, torch.device("cpu"))
    assert args.fp16 and args.use_cpu  # what a GPU run asks for: fp16 autocast + GradScaler (not runnable here)


@pytest.mark.parametrize("name", ["recover-1gpu.yaml", "recover-ddp.yaml", "recover-fsdp.yaml", "recover-zero3.yaml"])
def test_example_recovery_configs_are_accepted(name, monkeypatch):
    """docs/recovery.md's example files: their options validate and become TrainingArguments (ZeRO-3: the
    JSON is a DeepSpeed config; validating it needs the deepspeed package)."""
    import importlib.util
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the examples' paths are relative to the repository root
    options = yaml.safe_load((root / "examples" / "recovery" / name).read_text())["recovery"]["options"]
    if "deepspeed" in options and importlib.util.find_spec("deepspeed") is None:
        config = json.loads(Path(options["deepspeed"]).read_text())
        assert config["zero_optimization"]["stage"] == 3
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        return
    parsed = LoraOptions(**options)
    args = LoraRecovery(parsed).arguments("/nonexistent", 0, torch.bfloat16, torch.device("cpu"))
    assert args.bf16 and args.per_device_train_batch_size == parsed.device_batch
    assert args.gradient_accumulation_steps == parsed.gradient_accumulation_steps
    if parsed.fsdp:
        assert args.fsdp and args.fsdp_plugin_args["fsdp_version"] == 2
        assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
