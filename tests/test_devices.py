"""Devices through accelerate: a split / dispatched / disk-offloaded tiny model prunes exactly like one on a
single device (same mask, same logits), evaluates alike, saves a plain checkpoint; flags are validated."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from prunekit import api
from prunekit.cli import main
from prunekit.core.config import RunConfig
from prunekit.errors import UserError
from prunekit.runtime.devices import (
    check_device,
    checkpointing_on,
    gradient_checkpointing,
    input_device,
    is_dispatched,
    offloaded,
    parse_device_map,
    parse_max_memory,
    placement,
)

# the default allocator (measured) cannot probe offloaded weights and falls back to uniform there: the
# equivalence tests pin uniform on both sides
UNIFORM = {"name": "uniform"}

pytestmark = pytest.mark.usefixtures("one_thread")

# embeddings and the first two layers in memory, the rest offloaded to disk by accelerate
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
         "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk", "lm_head": "disk"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("devices") / "tiny"
    make_tiny_llama(9, 3, layers=4).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def _batches() -> list[torch.Tensor]:
    return list(torch.randint(3, 96, (4, 24), generator=torch.Generator().manual_seed(7)).split(2))


def _probe() -> torch.Tensor:
    return torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(11))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_probe(), use_cache=False).logits.float()


def _tree(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _cpu_hooked(model):
    """The same model dispatched by accelerate over a per-layer map with hooks on every module (all on cpu)."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(len(model.model.layers))}}
    return dispatch_model(model, device_map=device_map, force_hooks=True)


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("value", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_strings_accepted_by_the_config(value):
    assert RunConfig(device=value).device == value


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:-1", "CUDA", "cpu:0", "", "mps"])
def test_device_strings_refused(value):
    with pytest.raises(UserError, match="^device: .*accepted: cpu, cuda, cuda:N"):
        check_device(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_index_without_cuda_is_refused_by_load_model(model_dir):
    with pytest.raises(UserError, match="^device: cuda:0 requested"):
        api.load_model(str(model_dir), device="cuda:0")


def test_device_map_forms():
    assert parse_device_map("auto") == "auto" and parse_device_map(None) is None
    assert parse_device_map('{"model": 0, "lm_head": "disk"}') == {"model": 0, "lm_head": "disk"}
    assert parse_device_map({"model": "1", "lm_head": "cuda:1"}) == {"model": 1, "lm_head": "cuda:1"}
    for bad in ("everything", "[1, 2]", "{}", '{"model": "tpu"}', '{"model": true}', "{oops"):
        with pytest.raises(ValueError):
            parse_device_map(bad)


def test_max_memory_forms():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory('{"cuda:1": "10GB", "cpu": 1000000}') == {1: "10GB", "cpu": 1000000}
    for bad in ("70GiB", "cpu=", "cpu=lots", "tpu=1GiB", '{"cpu": -1}', "{", '{"cpu": true}'):
        with pytest.raises(ValueError):
            parse_max_memory(bad)


def test_placement_needs_an_offload_folder_for_disk():
    with pytest.raises(UserError, match="^offload_folder: "):
        placement("cpu", {"model": "cpu", "lm_head": "disk"})
    with pytest.raises(UserError, match="^device_map: --max-memory"):
        placement("cpu", None, "cpu=1GiB")
    assert placement("cuda:0" if torch.cuda.is_available() else "cpu") == {
        "device": "cuda:0" if torch.cuda.is_available() else "cpu"}


# ------------------------------------------------------------------ the must-show equivalences


@pytest.mark.parametrize("method", ["taylor", "moreau-gs"])
def test_hooked_dispatch_gives_the_same_mask_and_logits(model_dir, method):
    """Gradient scoring (forward and backward) through accelerate's hooks, then pruning with hooks attached."""
    reference, tokenizer, _ = api.load_model(str(model_dir))
    hooked = _cpu_hooked(api.load_model(str(model_dir))[0])
    assert is_dispatched(hooked) and not offloaded(hooked)
    want = api.prune(reference, tokenizer, method, 0.34, batches=_batches())
    got = api.prune(hooked, tokenizer, method, 0.34, batches=_batches())
    assert got.mask == want.mask
    assert got.reduction == want.reduction and want.reduction["params_removed_fraction"] > 0.1
    assert hasattr(hooked.model.layers[2].mlp.down_proj, "_hf_hook")  # hooks survive the shape change
    torch.testing.assert_close(_logits(hooked), _logits(reference), rtol=0, atol=1e-5)


def test_disk_offload_gives_the_same_mask_logits_and_checkpoint(model_dir, tmp_path):
    """The must-show split: embeddings + first layers in memory, the rest on disk (accelerate), data-free method."""
    before = _tree(model_dir)
    reference, tokenizer, _ = api.load_model(str(model_dir))
    split, _, _ = api.load_model(str(model_dir), device_map=SPLIT, offload_folder=tmp_path / "offload")
    assert offloaded(split) and split.model.layers[3].mlp.up_proj.weight.device.type == "meta"
    assert input_device(split) == torch.device("cpu")
    torch.testing.assert_close(_logits(split), _logits(reference), rtol=0, atol=1e-6)

    want = api.prune(reference, tokenizer, "magnitude", 0.34, allocation=UNIFORM)
    got = api.prune(split, tokenizer, "magnitude", 0.34, allocation=UNIFORM)
    assert got.mask == want.mask and got.layer_shapes == want.layer_shapes
    assert split.model.layers[3].mlp.up_proj.weight.device.type == "meta"  # still offloaded, now with the new shape
    assert split.model.layers[3].mlp.up_proj.weight.shape == reference.model.layers[3].mlp.up_proj.weight.shape
    torch.testing.assert_close(_logits(split), _logits(reference), rtol=0, atol=1e-6)

    out = api.save(got, tmp_path / "pruned")
    from safetensors.torch import load_file

    state = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert all(t.device.type == "cpu" for t in state.values())
    assert state["model.layers.3.mlp.up_proj.weight"].shape == reference.model.layers[3].mlp.up_proj.weight.shape
    reloaded, _, _ = api.load_model(str(out))
    assert not any(hasattr(m, "_hf_hook") for m in reloaded.modules())
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=0, atol=1e-6)
    assert _tree(model_dir) == before  # the input checkpoint (offload source) is untouched


def test_onloaded_modules_compute_on_cpu_and_hand_outputs_back(model_dir, tmp_path):
    """On a GPU, offloaded modules execute on the GPU; while onloaded (the trace for pruning) they compute on the
    CPU and must hand their output back to the caller's device, else the rotary tables or the residual (on the
    GPU) meet a CPU tensor. Here the GPU is a sentinel execution device: the hooks' settings are checked, and a
    forward inside the block (all on the CPU) still gives the reference logits."""
    from prunekit.runtime.devices import _hooked, onloaded

    reference, _, _ = api.load_model(str(model_dir))
    split, _, _ = api.load_model(str(model_dir), device_map=SPLIT, offload_folder=tmp_path / "offload")
    hooks = {name: hook for name, _, hook in _hooked(split) if getattr(hook, "offload", False)}
    gpu = torch.device("cuda", 0)
    for hook in hooks.values():
        hook.execution_device = gpu  # what accelerate sets on a GPU machine (main device)
    with onloaded(split, ["model.layers.2.mlp"]) as names:
        assert names == ["model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
        for name, hook in hooks.items():
            chosen = name in names
            assert (hook.execution_device, hook.io_same_device, hook.offload) == (
                (torch.device("cpu"), True, False) if chosen else (gpu, False, True)), name
    assert all((h.execution_device, h.io_same_device, h.offload) == (gpu, False, True) for h in hooks.values())
    for hook in hooks.values():
        hook.execution_device = torch.device("cpu")
    with onloaded(split):
        torch.testing.assert_close(_logits(split), _logits(reference), rtol=0, atol=1e-6)
    assert split.model.layers[3].mlp.up_proj.weight.device.type == "meta"


def test_bfloat16_offloaded_model_prunes_like_the_single_device_one(model_dir, tmp_path):
    """accelerate forbids casting a model with offloaded modules: data-free scoring reads the load dtype."""
    reference, tokenizer, _ = api.load_model(str(model_dir), "bfloat16")
    split, _, _ = api.load_model(str(model_dir), "bfloat16", device_map=SPLIT, offload_folder=tmp_path / "offload")
    want = api.prune(reference, tokenizer, "magnitude", 0.34, allocation=UNIFORM)
    got = api.prune(split, tokenizer, "magnitude", 0.34, allocation=UNIFORM)
    assert got.mask == want.mask and {p.dtype for p in split.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(_logits(split), _logits(reference), rtol=0, atol=0)


def test_tied_head_must_stay_with_the_embeddings(tmp_path):
    tied = tmp_path / "tied"
    make_tiny_llama(9, 3, layers=4, tie=True).save_pretrained(tied)
    make_tiny_tokenizer().save_pretrained(tied)
    with pytest.raises(UserError, match="^device_map: this model ties lm_head to model.embed_tokens.*lm_head -> disk"):
        api.load_model(str(tied), device_map=SPLIT, offload_folder=tmp_path / "offload")
    reference, tokenizer, _ = api.load_model(str(tied))
    split, _, _ = api.load_model(str(tied), device_map={**SPLIT, "lm_head": "cpu"}, offload_folder=tmp_path / "off")
    assert (api.prune(split, tokenizer, "magnitude", 0.34, allocation=UNIFORM).mask
            == api.prune(reference, tokenizer, "magnitude", 0.34, allocation=UNIFORM).mask)
    torch.testing.assert_close(_logits(split), _logits(reference), rtol=0, atol=1e-6)


def test_gradient_methods_refused_with_offload_model_untouched(model_dir, tmp_path):
    split, tokenizer, _ = api.load_model(str(model_dir), device_map=SPLIT, offload_folder=tmp_path / "offload")
    dense = _logits(split)
    with pytest.raises(UserError, match="^device_map: method 'taylor' needs gradients.*--device-map"):
        api.prune(split, tokenizer, "taylor", 0.34, batches=_batches())
    with pytest.raises(UserError, match="^device_map: recovery 'lora' trains through weights offloaded"):
        api.prune(split, tokenizer, "magnitude", 0.34, recovery={"method": "lora"})
    # the measuring allocator zeroes units to probe the loss, which meta weights do not allow: named, it is
    # refused; as the unnamed default it falls back to uniform (the other tests here prune that way)
    with pytest.raises(UserError, match="^allocation.name: allocator 'measured' measures the loss"):
        api.prune(split, tokenizer, "magnitude", 0.34, allocation={"name": "measured"})
    assert api.prune(copy.deepcopy(split), tokenizer, "magnitude", 0.34).allocation["allocator"] == "uniform"
    assert split.model.layers[0].mlp.up_proj.weight.shape[0] == 48
    torch.testing.assert_close(_logits(split), dense, rtol=0, atol=0)


def test_perplexity_on_an_offloaded_model_matches(model_dir, tmp_path):
    from prunekit.eval.perplexity import perplexity

    text = " ".join(["the cat sat on the mat and the dog ran"] * 40)
    reference, tokenizer, _ = api.load_model(str(model_dir))
    split, _, _ = api.load_model(str(model_dir), device_map=SPLIT, offload_folder=tmp_path / "offload")
    want = perplexity(reference, tokenizer, text, window=16, batch_size=2, progress=False)
    got = perplexity(split, tokenizer, text, window=16, batch_size=2, progress=False)
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)


def test_per_layer_checkpoint_loads_with_a_device_map(model_dir, tmp_path):
    """prunekit's own per-layer checkpoints (not plain from_pretrained) are dispatched by accelerate too."""
    model, tokenizer, _ = api.load_model(str(model_dir))
    result = api.prune(model, tokenizer, "magnitude", 0.34, layers=(1, 3))
    assert not result.uniform_shapes
    out = api.save(result, tmp_path / "per-layer")
    split, _, _ = api.load_model(str(out), device_map=SPLIT, offload_folder=tmp_path / "offload")
    assert offloaded(split)
    torch.testing.assert_close(_logits(split), _logits(model), rtol=0, atol=1e-6)
    hooked, _, _ = api.load_model(str(out), device_map={"": "cpu"})
    torch.testing.assert_close(_logits(hooked), _logits(model), rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_scores(model_dir):
    model, tokenizer, _ = api.load_model(str(model_dir))
    groups = api.build_groups(model)
    plain, _ = api.score(model, groups, "taylor", _batches())
    with gradient_checkpointing(model):
        assert checkpointing_on(model) and model.training
        checkpointed, _ = api.score(model, groups, "taylor", _batches())
    assert not checkpointing_on(model) and not model.training
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    result = api.prune(model, tokenizer, "taylor", 0.34, calibration={"gradient_checkpointing": True},
                       batches=_batches())
    assert result.config.calibration.gradient_checkpointing and not checkpointing_on(model)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_run_and_eval_with_disk_offload(model_dir, tmp_path, capsys):
    device_map = json.dumps(SPLIT)
    out = tmp_path / "out"
    config = tmp_path / "eval.yaml"
    config.write_text("evaluation:\n  perplexity: [ptb]\n  zero_shot: []\n  ppl_window: 32\n  ppl_max_windows: 4\n")
    code = main(["run", "--method", "magnitude", "--ratio", "0.34", "--model", str(model_dir), "--config", str(config),
                 "--output", str(out), "--device-map", device_map, "--offload-folder", str(tmp_path / "off")])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["device_map"] == SPLIT
    assert manifest["metrics"]["before"]["cache"]["skipped"]  # an offloaded model's weights are not hashed
    assert manifest["metrics"]["after"]["perplexity"]["ptb"]["ppl"] > 1
    reference, tokenizer, _ = api.load_model(str(model_dir))
    api.prune(reference, tokenizer, "magnitude", 0.34, allocation=UNIFORM)
    torch.testing.assert_close(_logits(api.load_model(str(out))[0]), _logits(reference), rtol=0, atol=1e-6)

    results = []
    for extra in ([], ["--device-map", device_map, "--offload-folder", str(tmp_path / "off2")]):
        target = tmp_path / f"m{len(results)}.json"
        assert main(["eval", "--model", str(out), "--config", str(config), "--json", str(target), *extra]) == 0
        results.append(json.loads(target.read_text())["metrics"]["perplexity"]["ptb"]["ppl"])
    assert results[1] == pytest.approx(results[0], rel=1e-6)


@pytest.mark.study
def test_device_check_script_passes_on_cpu(capsys):
    """The GPU check (benchmarks/studies/devices_check.py) runs the same code path here with --device cpu."""
    from prunekit.benchmarks.studies.devices_check import main as check

    assert check(["--device", "cpu", "--only", "single_and_hooked", "offload", "auto"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"]["single_and_hooked"]["hooked"]["mask_equal"]
    offload = report["checks"]["offload"]
    assert offload["magnitude"]["mask_equal"] and offload["offloaded_modules"] > 0
    assert offload["magnitude"]["logits_max_diff"] == 0 and offload["reload_cpu_logits_max_diff"] == 0
    assert offload["perplexity"]["split"] == pytest.approx(offload["perplexity"]["single"], rel=1e-6)
