"""Per-layer-shape checkpoints load without prunekit (their own code, ``trust_remote_code``), and
``load_pruned`` takes folders, hub ids and hub caches, old checkpoints included."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

import prunekit.runtime.assets as assets
from prunekit.adapters.grouping import GrouperOptions, apply_plan, build_groups
from prunekit.adapters.llama import LlamaAdapter
from prunekit.core.select import select
from prunekit.importance.base import ScoringContext
from prunekit.io.export import load_pruned, save_pruned
from prunekit.io.remote_code import AUTO_MAP, CONFIG_FILE, MODELING_FILE, write_remote_code
from prunekit.plugin.registry import get_registry

IDS = torch.arange(24).view(2, 12) % 96
HUB_ID = "prunekit-tests/tiny-pruned"

# name: (query heads, kv heads, ratio, scope, layers, grouper options)
CASES = {
    # GQA 9q/3kv, global ranking: layers keep 3, 6 and 9 query heads (and unequal MLP widths)
    "gqa9x3-uneven-heads": (9, 3, 0.4, "global", range(0, 4), {}),
    # only MLP channels, only the middle layers
    "mlp-only": (9, 3, 0.3, "local", range(1, 3), {"prune_attention": False}),
    # every layer alike, but 7 heads no longer divide hidden size 72 (transformers refuses the config)
    "mha9-heads-not-dividing-hidden": (9, 9, 0.25, "local", range(0, 4), {}),
}

# Runs with -I -S (no site, no PYTHONPATH); argv: dependency dirs (JSON), jobs (JSON), result file.
# A meta-path finder makes prunekit unimportable, as on a machine where it is not installed.
LOADER = r'''
import json, sys
sys.path[:0] = json.loads(sys.argv[1])


class NoPrunekit:
    def find_spec(self, name, path=None, target=None):
        if name == "prunekit" or name.startswith("prunekit."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NoPrunekit())
try:
    import prunekit  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    sys.exit("prunekit is importable in the loader process")

import torch
from transformers import AutoModelForCausalLM

ids = torch.arange(24).view(2, 12) % 96
results = {}
for name, source, kwargs in json.loads(sys.argv[2]):
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=getattr(torch, dtype),
                                                     **kwargs).eval()
        with torch.no_grad():
            logits = model(ids).logits
        results[f"{name}/{dtype}"] = {
            "logits": logits, "class": type(model).__name__, "module": type(model).__module__,
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        }
# a model loaded with its code saves again with save_pretrained (transformers copies the code along)
name, source, kwargs = json.loads(sys.argv[2])[0]
model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, **kwargs)
model.save_pretrained(sys.argv[3] + ".resaved")
with torch.no_grad():
    results["resaved"] = {"logits": AutoModelForCausalLM.from_pretrained(
        sys.argv[3] + ".resaved", trust_remote_code=True).eval()(ids).logits, "source": name}
loaded = sorted(m for m in sys.modules if m == "prunekit" or m.startswith("prunekit."))
torch.save({"results": results, "prunekit_modules_loaded": loaded}, sys.argv[3])
'''


def prune_case(name: str):
    """A tiny model pruned as ``CASES[name]`` says, its config synced (ready to save)."""
    n_q, n_kv, ratio, scope, layers, options = CASES[name]
    model = make_tiny_llama(n_q, n_kv, tie=True)
    adapter = LlamaAdapter(model)
    groups = build_groups(model, adapter, layers, GrouperOptions(**options))
    entry = get_registry().method("magnitude")
    kept = select(groups, entry.cls(entry.options()).scores(ScoringContext(model, groups, [])), ratio, scope)
    apply_plan(model, adapter, groups, kept)
    adapter.sync_config()
    return model


# Other families, pruned in layer 1 only (heads and MLP): OLMo 2's q/k norms shrink with the heads and
# GPT-NeoX saves its lm_head as embed_out; the loading code handles both without naming them.
FAMILIES = ("olmo2", "gpt_neox")


def prune_family(arch: str):
    """A tiny ``arch`` model (see tests/test_architectures.py) with layer 1's heads and channels halved."""
    from test_architectures import make_model

    import prunekit

    model = make_model(arch)
    prunekit.prune(model, None, method="magnitude", ratio=0.5, layers=(1, 2))
    return model


def prune_qwen3_by_hand():
    """A tiny Qwen3 (no prunekit adapter needed) with one query head per KV group and MLP channels cut
    from layer 1, as an adapter would: the exporter names no architecture."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    model = transformers.Qwen3ForCausalLM(config).eval()
    layer, hd = model.model.layers[1], config.head_dim
    heads = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in (0, 2)])  # head 0 of each KV group
    channels = torch.arange(0, 48, 2)

    def cut(linear, rows=None, cols=None):
        weight = linear.weight.detach()
        weight = weight[rows] if rows is not None else weight
        weight = weight[:, cols] if cols is not None else weight
        new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
        new.weight.data.copy_(weight)
        return new

    with torch.no_grad():
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.o_proj = cut(attn.q_proj, rows=heads), cut(attn.o_proj, cols=heads)
        attn.num_key_value_groups = 1
        mlp.gate_proj, mlp.up_proj = cut(mlp.gate_proj, rows=channels), cut(mlp.up_proj, rows=channels)
        mlp.down_proj, mlp.intermediate_size = cut(mlp.down_proj, cols=channels), len(channels)
    return model


def _imports(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports (relative imports by module name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> None:
    """The hub cache layout (``models--org--name/refs/main`` → ``snapshots/<commit>``) holding ``checkpoint``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, repo / "snapshots" / commit)


def dependency_dirs() -> list[str]:
    """Where torch, transformers and their dependencies are installed (never prunekit's own tree)."""
    import site

    import huggingface_hub
    import safetensors

    dirs = [str(Path(m.__file__).resolve().parents[1]) for m in (torch, transformers, safetensors, huggingface_hub)]
    return list(dict.fromkeys(dirs + site.getsitepackages()))


def load_without_prunekit(root: Path, jobs: list) -> dict:
    """Run the loader in a fresh ``python -I -S`` where prunekit cannot be imported; its results."""
    script = root / "load_without_prunekit.py"
    script.write_text(LOADER)
    env = {"HF_HOME": str(root / "hf-home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), json.dumps(dependency_dirs()), json.dumps(jobs),
                           str(root / "result.pt")], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "result.pt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each case pruned, saved with ``save_pruned``, and loaded in a process where prunekit is absent."""
    root = tmp_path_factory.mktemp("remote")
    models, jobs = {}, []
    for name in CASES:
        models[name] = prune_case(name)
        save_pruned(models[name], None, root / name, {"case": name})
        jobs.append([name, str(root / name), {}])
    models["qwen3-by-hand"] = prune_qwen3_by_hand()
    save_pruned(models["qwen3-by-hand"], None, root / "qwen3-by-hand", {})
    jobs.append(["qwen3-by-hand", str(root / "qwen3-by-hand"), {}])
    for arch in FAMILIES:
        models[arch] = prune_family(arch)
        save_pruned(models[arch], None, root / arch, {"case": arch})
        jobs.append([arch, str(root / arch), {"attn_implementation": "eager"}])
    fake_hub_cache(root / "hub", HUB_ID, root / "gqa9x3-uneven-heads")
    jobs.append(["hub-cache", HUB_ID, {"cache_dir": str(root / "hub")}])
    return root, models, load_without_prunekit(root, jobs)


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(CASES))
def test_per_layer_checkpoint_loads_without_prunekit(checkpoints, name):
    root, models, loaded = checkpoints
    assert loaded["prunekit_modules_loaded"] == []
    config = json.loads((root / name / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["PrunekitForCausalLM"]
    assert config["prunekit_base"] == {"model_type": "llama", "architecture": "LlamaForCausalLM",
                                       "config_class": "LlamaConfig"}
    assert _imports(root / name / MODELING_FILE) == {"torch", "transformers", "configuration_prunekit"}
    assert _imports(root / name / CONFIG_FILE) == {"transformers"}
    result = loaded["results"][f"{name}/float32"]
    assert result["class"] == "PrunekitForCausalLM"
    assert result["module"].startswith("transformers_modules.")  # the checkpoint's copy, not prunekit's
    assert result["dtypes"] == ["torch.float32"]
    with torch.no_grad():
        expected = models[name](IDS).logits
    assert (result["logits"] - expected).abs().max().item() <= 1e-5


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(CASES))
def test_remote_code_loads_in_bfloat16(checkpoints, name):
    root, models, loaded = checkpoints
    result = loaded["results"][f"{name}/bfloat16"]
    assert result["dtypes"] == ["torch.bfloat16"]  # the resized modules too
    with torch.no_grad():
        same_build = load_pruned(root / name, dtype=torch.bfloat16)(IDS).logits
        full = models[name](IDS).logits
    assert torch.equal(result["logits"], same_build)
    # bfloat16 keeps 8 bits of mantissa: within a few per cent of the float32 logits' scale
    assert (result["logits"].float() - full).abs().max().item() <= 0.05 * full.abs().max().item()


@pytest.mark.subprocess
def test_exporter_names_no_architecture(checkpoints):
    root, models, loaded = checkpoints
    config = json.loads((root / "qwen3-by-hand" / "config.json").read_text())
    assert config["prunekit_base"] == {"model_type": "qwen3", "architecture": "Qwen3ForCausalLM",
                                       "config_class": "Qwen3Config"}
    assert config["prunekit_modules"]["attributes"] == {"model.layers.1.self_attn": {"num_key_value_groups": 1},
                                                        "model.layers.1.mlp": {"intermediate_size": 24}}
    with torch.no_grad():
        expected = models["qwen3-by-hand"](IDS).logits
        assert torch.equal(load_pruned(root / "qwen3-by-hand")(IDS).logits, expected)
    for dtype in ("float32", "bfloat16"):
        result = loaded["results"][f"qwen3-by-hand/{dtype}"]
        assert result["class"] == "PrunekitForCausalLM" and result["dtypes"] == [f"torch.{dtype}"]
    assert (loaded["results"]["qwen3-by-hand/float32"]["logits"] - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", FAMILIES)
def test_other_families_load_without_prunekit(checkpoints, arch):
    root, models, loaded = checkpoints
    config = json.loads((root / arch / "config.json").read_text())
    assert config["architectures"] == ["PrunekitForCausalLM"] and config["prunekit_base"]["model_type"] == arch
    result = loaded["results"][f"{arch}/float32"]
    assert result["class"] == "PrunekitForCausalLM" and result["module"].startswith("transformers_modules.")
    with torch.no_grad():
        expected = models[arch](IDS).logits
    assert (result["logits"] - expected).abs().max().item() <= 1e-5


def test_remote_loaded_model_saves_again_with_its_code(checkpoints):
    _, models, loaded = checkpoints
    resaved = loaded["results"]["resaved"]
    with torch.no_grad():
        expected = models[resaved["source"]](IDS).logits
    assert (resaved["logits"] - expected).abs().max().item() <= 1e-5


def test_remote_code_loads_from_a_hub_cache(checkpoints):
    _, models, loaded = checkpoints
    with torch.no_grad():
        expected = models["gqa9x3-uneven-heads"](IDS).logits
    assert (loaded["results"]["hub-cache/float32"]["logits"] - expected).abs().max().item() <= 1e-5


def test_the_cases_are_per_layer_and_the_heads_uneven(checkpoints):
    _, models, _ = checkpoints
    heads = {s["num_attention_heads"] for s in models["gqa9x3-uneven-heads"].config.prunekit_layer_shapes}
    assert len(heads) >= 3 and max(heads) == 9
    mlp = models["mlp-only"].config.prunekit_layer_shapes
    assert {s["num_attention_heads"] for s in mlp} == {9} and len({s["intermediate_size"] for s in mlp}) > 1
    mha = models["mha9-heads-not-dividing-hidden"].config
    assert {s["num_attention_heads"] for s in mha.prunekit_layer_shapes} == {7} and mha.hidden_size % 7


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_pruned_reads_the_same_checkpoint_without_running_its_code(checkpoints, name):
    root, models, _ = checkpoints
    model = load_pruned(root / name)
    assert type(model) is transformers.LlamaForCausalLM
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, models[name](IDS).logits)
    assert LlamaAdapter(model).module_shapes() == LlamaAdapter(models[name]).module_shapes()


def test_module_shapes_lists_exactly_what_pruning_changed():
    model = make_tiny_llama(9, 3)
    assert LlamaAdapter(model).module_shapes() == {"linear": {}, "tensors": {}, "attributes": {}, "config_views": {}}
    pruned = prune_case("mlp-only")
    spec, width = LlamaAdapter(pruned).module_shapes(), pruned.model.layers[1].mlp.gate_proj.out_features
    assert width == 48 - round(0.3 * 48) == pruned.model.layers[2].mlp.gate_proj.out_features
    assert sorted(spec["linear"]) == [f"model.layers.{i}.mlp.{p}_proj" for i in (1, 2) for p in ("down", "gate", "up")]
    assert spec["linear"]["model.layers.1.mlp.down_proj"] == [width, 72]
    assert spec["linear"]["model.layers.2.mlp.up_proj"] == [72, width]
    assert spec["attributes"] == {f"model.layers.{i}.mlp": {"intermediate_size": width} for i in (1, 2)}
    spec = LlamaAdapter(prune_case("gqa9x3-uneven-heads")).module_shapes()
    groups = {n: a["num_key_value_groups"] for n, a in spec["attributes"].items() if "num_key_value_groups" in a}
    assert groups and set(groups.values()) <= {1, 2}


def test_uniform_checkpoint_carries_no_code_and_loads_plainly(tmp_path):
    model = make_tiny_llama(8, 2)
    adapter = LlamaAdapter(model)
    groups = build_groups(model, adapter, range(4), GrouperOptions())
    entry = get_registry().method("magnitude")
    apply_plan(model, adapter, groups, select(groups, entry.cls(entry.options()).scores(
        ScoringContext(model, groups, [])), 0.5))
    adapter.sync_config()
    save_pruned(model, None, tmp_path / "out", {})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not {"auto_map", "prunekit_modules", "prunekit_base"} & set(config)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert not (tmp_path / "out" / MODELING_FILE).exists() and not (tmp_path / "out" / CONFIG_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_resaving_a_reloaded_checkpoint_refreshes_its_code(checkpoints, tmp_path):
    root, models, _ = checkpoints
    model = load_pruned(root / "mlp-only")
    model.save_pretrained(tmp_path / "plain-save")  # no code copied, so no auto_map pointing at none
    assert "auto_map" not in json.loads((tmp_path / "plain-save" / "config.json").read_text())
    assert torch.equal(load_pruned(tmp_path / "plain-save").model.layers[1].mlp.up_proj.weight,
                       model.model.layers[1].mlp.up_proj.weight)
    save_pruned(model, None, tmp_path / "again", {})
    before = json.loads((root / "mlp-only" / "config.json").read_text())
    after = json.loads((tmp_path / "again" / "config.json").read_text())
    assert after["prunekit_modules"] == before["prunekit_modules"] and after["auto_map"] == AUTO_MAP
    # a uniform model saved into a folder holding stale code and keys gets rid of them
    uniform = make_tiny_llama(4, 4)
    uniform.save_pretrained(tmp_path / "stale")
    for name in (CONFIG_FILE, MODELING_FILE):
        shutil.copy(root / "mlp-only" / name, tmp_path / "stale" / name)
    config = json.loads((tmp_path / "stale" / "config.json").read_text())
    config.update({k: before[k] for k in ("auto_map", "prunekit_base", "prunekit_modules", "architectures")})
    (tmp_path / "stale" / "config.json").write_text(json.dumps(config))
    assert write_remote_code(uniform, tmp_path / "stale") is False
    assert sorted(p.name for p in (tmp_path / "stale").iterdir()) == ["config.json", "generation_config.json",
                                                                        "model.safetensors"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "stale").config.architectures == ["LlamaForCausalLM"]


def _older_checkpoint(source: Path, dest: Path) -> Path:
    """``source`` as prunekit 0.1.0 wrote it: per-layer widths in ``prunekit_layer_shapes`` only, no code."""
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    for key in ("auto_map", "prunekit_base", "prunekit_modules"):
        del config[key]
    config["architectures"] = ["LlamaForCausalLM"]
    (dest / "config.json").write_text(json.dumps(config))
    (dest / CONFIG_FILE).unlink()
    (dest / MODELING_FILE).unlink()
    return dest


@pytest.mark.parametrize("older", [False, True], ids=["current", "older-prunekit"])
def test_load_pruned_from_hub_id_in_a_hub_cache(checkpoints, tmp_path, monkeypatch, older):
    root, models, _ = checkpoints
    source = root / "gqa9x3-uneven-heads"
    if older:
        source = _older_checkpoint(source, tmp_path / "older")
    fake_hub_cache(tmp_path / "hub", HUB_ID, source)
    with torch.no_grad():
        expected = models["gqa9x3-uneven-heads"](IDS).logits
        model = load_pruned(HUB_ID, cache_dir=tmp_path / "hub", local_files_only=True)
        assert torch.equal(model(IDS).logits, expected)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the cache is used without being told
        model = load_pruned(HUB_ID, cache_dir=tmp_path / "hub")
        assert torch.equal(model(IDS).logits, expected)


def test_load_pruned_reads_a_uniform_model_from_a_hub_cache(tmp_path):
    model = make_tiny_llama(4, 2)
    model.save_pretrained(tmp_path / "plain")
    fake_hub_cache(tmp_path / "hub", "prunekit-tests/plain", tmp_path / "plain")
    reloaded = load_pruned("prunekit-tests/plain", cache_dir=tmp_path / "hub", local_files_only=True)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_older_checkpoint_still_loads_from_a_folder(checkpoints, tmp_path):
    root, models, _ = checkpoints
    model = load_pruned(_older_checkpoint(root / "mlp-only", tmp_path / "older"))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, models["mlp-only"](IDS).logits)


@pytest.mark.slow
@pytest.mark.skipif(not assets.dist_version(assets.SMOLLM2_DIST),
                    reason=f"embedded model missing: {assets.MODEL_SETUP}")
def test_default_run_on_the_embedded_model_loads_without_prunekit(tmp_path):
    """SmolLM2's default run (layers 4-27 pruned, the rest whole) loads with its own code, exactly."""
    from prunekit.cli import main

    out = tmp_path / "pruned"
    assert main(["run", "--no-eval", "--method", "magnitude", "--output", str(out)]) == 0
    loaded = load_without_prunekit(tmp_path, [["smollm2", str(out), {}]])
    assert loaded["prunekit_modules_loaded"] == []
    model = load_pruned(out)
    assert len({s["num_attention_heads"] for s in model.config.prunekit_layer_shapes}) == 2
    with torch.no_grad():
        expected = model(IDS).logits
    assert (loaded["results"]["smollm2/float32"]["logits"] - expected).abs().max().item() <= 1e-5
    assert loaded["results"]["smollm2/bfloat16"]["dtypes"] == ["torch.bfloat16"]
