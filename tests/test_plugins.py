"""The plugin host and registry: entry points, allow/deny lists, components selected by name, documented
hook signatures, listings, and the conformance kit run on every installed method."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict

import prunekit.plugin.hookspecs as hookspecs
from prunekit import hookimpl
from prunekit.cli import main
from prunekit.errors import UserError
from prunekit.importance.base import Importance
from prunekit.plugin.host import build_host, get_host
from prunekit.plugin.registry import (
    EVALUATOR_CALL,
    GROUPER_CALL,
    TABLES,
    Registry,
    describe_plugins,
    register_signature,
)


@pytest.fixture
def broken_distribution(tmp_path, monkeypatch):
    """An installed distribution whose prunekit entry point fails to import."""
    info = tmp_path / "broken_prunekit_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-prunekit-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[prunekit]\nbroken = broken_prunekit_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "broken"


def test_builtins_load_through_entry_points():
    host = build_host()
    registry = Registry.from_host(host)
    assert {"magnitude", "random", "taylor"} <= set(registry.methods)
    assert registry.methods["taylor"].provider == "prunekit"
    assert "blocks" in registry.groupers
    assert {"uniform", "global", "measured"} <= set(registry.allocators)
    assert registry.allocators["measured"].provider == "prunekit"


def test_broken_plugin_is_reported_and_others_work(broken_distribution):
    host = build_host()
    assert "ModuleNotFoundError" in host.failed[broken_distribution].reason
    [row] = [r for r in describe_plugins(host) if r["name"] == "broken"]
    assert row["package"] == "broken-prunekit-plugin" and row["fix"] == "PRUNEKIT_DISABLE_PLUGINS=broken"
    registry = Registry.from_host(host)
    assert "taylor" in registry.methods
    with pytest.raises(UserError, match="broken"):
        registry.method("does-not-exist")


def test_disable_and_load_lists(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DISABLE_PLUGINS", "taylor, random")
    assert set(Registry.from_host(build_host()).methods).isdisjoint({"taylor", "random"})
    monkeypatch.delenv("PRUNEKIT_DISABLE_PLUGINS")
    monkeypatch.setenv("PRUNEKIT_LOAD_PLUGINS", "magnitude")
    host = build_host()
    names = {p["name"] for p in describe_plugins(host)}
    assert {"blocks", "llama", "qwen3", "magnitude"} <= names and not names & {"taylor", "random", "moreau"}
    assert all(n == "magnitude" or not n.startswith(("taylor", "moreau", "lora")) for n in names)  # the core's stay


def test_misspelled_hook_disables_the_plugin():
    class Typo:
        @hookimpl
        def prunekit_register_importance(self, register):  # missing "s"
            pass

    host = build_host()
    assert not host.register(Typo(), "typo")
    assert "did you mean 'prunekit_register_importances'" in host.failed["typo"].reason
    assert host.pm.get_plugin("typo") is None
    host.pm.check_pending()  # nothing unverified is left behind


def test_preset_with_invalid_defaults_is_the_plugins_bug_not_the_users():
    from prunekit.builtin.taylor import Taylor

    class BadPreset:
        @hookimpl
        def prunekit_register_importances(self, register):
            register("taylor-bad", Taylor, defaults={"variant": "fourth"})

    host = build_host()
    host.pm.register(BadPreset(), name="bad-preset")
    registry = Registry.from_host(host)
    assert "taylor-bad" not in registry.methods and "taylor" in registry.methods
    reason = host.failed["bad-preset"].reason
    assert "method 'taylor-bad' options defaults do not validate: TaylorOptions.variant" in reason
    assert "method_options" not in reason


# ------------------------------------------------------------------ every hook usable from a run

ROOT = Path(__file__).resolve().parent.parent
RUN = ["run", "--no-eval", "--method", "magnitude", "--ratio", "0.34"]


class FirstLayersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = 1


def first_layers_mlp(model, adapter, layers, options):
    """Throw-away grouper: MLP channels of the first ``n_layers`` of the pruned range only."""
    from prunekit.adapters.base import Adapter
    from prunekit.adapters.grouping import GrouperOptions, build_groups

    assert isinstance(model, torch.nn.Module) and isinstance(adapter, Adapter) and isinstance(layers, range)
    assert isinstance(options, FirstLayersOptions)  # validated by its own model, handed over as an instance
    picked = range(layers.start, layers.start + options.n_layers)
    return build_groups(model, adapter, picked, GrouperOptions(prune_attention=False))


class ThrowAwayGrouper:
    @hookimpl
    def prunekit_register_groupers(self, register):
        register("first-layers", first_layers_mlp, options=FirstLayersOptions)


@pytest.fixture
def live_plugin():
    """``live_plugin(obj, name)`` registers a throw-away plugin on the process-wide host for one test."""
    names = []

    def _register(plugin, name):
        assert get_host().register(plugin, name)
        names.append(name)

    yield _register
    for name in names:
        get_host().pm.unregister(name=name)


def _run_with(tmp_path, tiny_model_dir, config: str):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("selection:\n  layers: [0, 4]\n" + config)
    out = tmp_path / "out"
    code = main([*RUN, "--model", str(tiny_model_dir), "--output", str(out), "--config", str(cfg)])
    return code, (json.loads((out / "run.json").read_text()) if code == 0 else None)


@pytest.mark.parametrize("config", [
    "grouper:\n  name: blocks\n  options: {prune_attention: false}\n",
    "grouper:\n  prune_attention: false\n",  # the flat keys of older configs still work
])
def test_grouper_by_name_with_options_recorded_in_run_json(tmp_path, tiny_model_dir, config):
    code, manifest = _run_with(tmp_path, tiny_model_dir, config)
    assert code == 0
    assert manifest["grouper"] == {"name": "blocks", "provider": "prunekit",
                                   "options": {"attention_unit": "heads", "prune_attention": False,
                                               "prune_mlp": True}}
    assert manifest["config"]["grouper"] == {"name": "blocks", "options": {"prune_attention": False}}
    assert all(name.endswith("mlp") for name in manifest["mask"])


def test_registered_grouper_is_selected_and_called_as_documented(live_plugin, tmp_path, tiny_model_dir):
    live_plugin(ThrowAwayGrouper(), "throwaway-grouper")
    code, manifest = _run_with(tmp_path, tiny_model_dir, "grouper: {name: first-layers, options: {n_layers: 2}}\n")
    assert code == 0
    assert manifest["grouper"] == {"name": "first-layers", "provider": "throwaway-grouper",
                                   "options": {"n_layers": 2}}
    assert sorted(manifest["mask"]) == ["layers.0.mlp", "layers.1.mlp"]


@pytest.mark.parametrize("config,expected", [
    ("grouper: {name: blocks, options: {prune_heads: true}}\n", "grouper.options.prune_heads: Extra inputs"),
    ("grouper: {name: blocks, options: {attention_unit: rows}}\n", "grouper.options.attention_unit"),
    ("grouper: {name: blokcs}\n", "groupers: unknown name 'blokcs'; available: blocks"),
    ("grouper: {name: blocks, prune_mlp: false}\n", "grouper.prune_mlp"),
])
def test_bad_grouper_config_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, config, expected):
    code, _ = _run_with(tmp_path, tiny_model_dir, config)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


class ScaleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0


class ThrowAwayEvaluator:
    @hookimpl
    def prunekit_register_evaluators(self, register):
        register("param-count", lambda model, tokenizer, options: {"params": model.num_parameters() * options.scale},
                 options=ScaleOptions, description="parameters times a scale")


def test_evaluator_options_are_validated_and_recorded(live_plugin):
    from conftest import make_tiny_llama, make_tiny_tokenizer

    from prunekit.core.evaluation import EvalSpec
    from prunekit.eval.suite import evaluate_model

    live_plugin(ThrowAwayEvaluator(), "throwaway-evaluator")
    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    spec = EvalSpec(perplexity=[], zero_shot=[], evaluators={"param-count": {"scale": 2}})
    result = evaluate_model(model, tok, spec, progress=False)
    assert result["evaluators"]["param-count"] == {"params": 2.0 * model.num_parameters()}
    assert result["evaluator_options"]["param-count"] == {"name": "param-count", "provider": "throwaway-evaluator",
                                                          "options": {"scale": 2.0}}
    with pytest.raises(UserError, match=r"^evaluation.evaluators.param-count.scle: Extra inputs"):
        evaluate_model(model, tok, spec.model_copy(update={"evaluators": {"param-count": {"scle": 2}}}))
    with pytest.raises(UserError, match=r"^evaluation.evaluators.param-count.scale: expected a number, not the text"):
        evaluate_model(model, tok, spec.model_copy(update={"evaluators": {"param-count": {"scale": "2"}}}))


# ------------------------------------------------------------------ one documented signature per hook

REGISTER_HOOKS = {spec.hook: table for table, spec in TABLES.items()}
CALLS = {"prunekit_register_groupers": "fn(" + ", ".join(GROUPER_CALL) + ")",
         "prunekit_register_evaluators": "fn(" + ", ".join(EVALUATOR_CALL) + ")"}


@pytest.mark.parametrize("hook", sorted(REGISTER_HOOKS))
def test_register_signature_is_the_documented_one(hook):
    """The hookspec docstring and docs/plugins.md state exactly the register(...) the host accepts."""
    signature = register_signature(REGISTER_HOOKS[hook])
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert f"``{signature}``" in doc
    section = (ROOT / "docs" / "plugins.md").read_text().split(f"### {hook}\n")[1].split("\n### ")[0]
    assert f"`{signature}`" in section
    if hook in CALLS:
        assert f"``{CALLS[hook]}``" in doc and f"`{CALLS[hook]}`" in section


TEACHER_CALL = "cls(options).recover(model, tokenizer, config, teacher=teacher)"


class _Recorded(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlainRecovery:
    Options = _Recorded
    calls: list = []

    def __init__(self, options):
        self.options = options

    def recover(self, model, tokenizer, config):
        PlainRecovery.calls.append(("plain", model))
        return {}


class TaughtRecovery(PlainRecovery):
    needs_teacher = True

    def recover(self, model, tokenizer, config, teacher=None):
        params = list(teacher.parameters())
        PlainRecovery.calls.append(("taught", teacher is not model, teacher.training,
                                    any(p.requires_grad for p in params), {p.dtype for p in params},
                                    teacher.model.layers[1].mlp.gate_proj.out_features,
                                    {n: t.clone() for n, t in teacher.state_dict().items()}))
        return {"taught": True}


class Recoveries:
    @hookimpl
    def prunekit_register_recovery(self, register):
        register("plain-recovery", PlainRecovery)
        register("taught-recovery", TaughtRecovery)


def test_recovery_teacher_contract_is_documented_and_kept(live_plugin):
    """``needs_teacher = True``: recover(..., teacher=) gets the untouched dense copy (same dtype, eval, no grad);
    a class without it is called with the three documented arguments only."""
    from conftest import make_tiny_llama, make_tiny_tokenizer

    import prunekit

    doc = inspect.getdoc(hookspecs.prunekit_register_recovery)
    section = (ROOT / "docs" / "plugins.md").read_text().split("### prunekit_register_recovery\n")[1].split("\n### ")[0]
    assert f"``{TEACHER_CALL}``" in doc and "``needs_teacher = True``" in doc
    assert f"`{TEACHER_CALL}`" in section and "`needs_teacher = True`" in section
    live_plugin(Recoveries(), "recoveries")
    PlainRecovery.calls.clear()
    for name in ("plain-recovery", "taught-recovery"):
        model = make_tiny_llama(9, 3).to(torch.bfloat16)
        dense = {n: t.clone() for n, t in model.state_dict().items()}
        width = model.model.layers[1].mlp.gate_proj.out_features
        result = prunekit.prune(model, make_tiny_tokenizer(), method="magnitude", ratio=0.5, layers=(1, 3),
                                allocation={"name": "uniform"}, recovery={"method": name})
        assert model.model.layers[1].mlp.gate_proj.out_features < width
        if name == "taught-recovery":
            kind, distinct, training, grads, dtypes, teacher_width, state = PlainRecovery.calls[-1]
            assert kind == "taught" and distinct and not training and not grads and dtypes == {torch.bfloat16}
            assert teacher_width == width and all(torch.equal(dense[n], t) for n, t in state.items())
            assert result.manifest()["recovery"]["teacher"] == {"source": "dense copy of the model before pruning"}
        else:
            assert PlainRecovery.calls[-1] == ("plain", model) and "teacher" not in result.manifest()["recovery"]


def test_every_hookspec_is_a_table_or_a_lifecycle_hook_called_with_its_arguments():
    """Lifecycle hooks: the keyword arguments at every call site in the core are the hookspec's arguments."""
    specs = {n: inspect.signature(getattr(hookspecs, n)) for n in dir(hookspecs) if n.startswith("prunekit_")}
    lifecycle = set(specs) - set(REGISTER_HOOKS)
    assert set(REGISTER_HOOKS) <= set(specs) and lifecycle
    called: dict[str, list[set[str]]] = {}
    for path in (ROOT / "prunekit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in lifecycle:
                assert not node.args, f"{path.name}: hooks take keyword arguments only"
                called.setdefault(node.func.attr, []).append({k.arg for k in node.keywords})
    for hook in lifecycle:
        assert called.get(hook), f"{hook} is specified but never called"
        assert all(kw == set(specs[hook].parameters) for kw in called[hook]), (hook, called[hook])


class Observer:
    def __init__(self):
        self.calls = []

    @hookimpl
    def prunekit_after_scoring(self, context, scores):
        self.calls.append(("scores", len(context.groups), [s.numel() for s in scores]))

    @hookimpl
    def prunekit_after_pruning(self, context, model):
        self.calls.append(("pruned", model is context.model))


def test_lifecycle_hooks_fire_once_per_run(live_plugin, tmp_path, tiny_model_dir):
    observer = Observer()
    live_plugin(observer, "observer")
    code, manifest = _run_with(tmp_path, tiny_model_dir, "")
    assert code == 0
    assert observer.calls == [("scores", len(manifest["mask"]), [m["n_units"] for m in manifest["mask"].values()]),
                              ("pruned", True)]


# ------------------------------------------------------------------ listings


def test_plugins_lists_what_each_plugin_registered(capsys):
    assert main(["plugins"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["moreau"]["registered"] == {"methods": ["moreau", "moreau-gs", "moreau-gs-paper", "moreau-gs-reference",
                                                        "moreau-reference"]}
    assert rows["blocks"]["registered"] == {"groupers": ["blocks"]}
    assert rows["lora"]["registered"] == {"recovery": ["lora"]}
    assert {"llama", "mistral", "qwen2"} <= set(rows["llama"]["registered"]["adapters"])  # by model type
    assert rows["taylor"]["package"] == "prunekit" and rows["taylor"]["hooks"] == ["prunekit_register_importances"]


def test_methods_prints_the_description_column(capsys):
    from prunekit.plugin.registry import get_registry

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "description" in listing
    for name, entry in get_registry().methods.items():
        row = next(line for line in listing.splitlines() if line.startswith(f"│ {name} "))
        assert entry.description and " ".join(entry.description.split()[:2]) in row


# ------------------------------------------------------------------ author's kit

# The Moreau presets run with fewer iterations here (same code path, a fraction of the time).
FAST = {"iterations": 2, "averaged": 1}


@pytest.mark.parametrize("method", sorted(Registry.from_host(build_host()).methods))
def test_every_registered_method_conforms(prunekit_conformance, method):
    """The pytest11 fixture plugin authors use, run on every installed method (built-ins and the example)."""
    options = FAST if method.startswith("moreau") else None
    report = prunekit_conformance(method, options=options)
    assert report.max_logit_diff <= 1e-4 and all(r > 0 for r in report.removed)


def test_conformance_catches_a_method_that_breaks_the_contract(live_plugin):
    from prunekit.plugin.testing import ConformanceError, check_method

    class WrongShape(Importance):
        def scores(self, ctx):
            return [torch.ones(g.n_units + 1) for g in ctx.groups]

    class Unseeded(Importance):
        def scores(self, ctx):
            return [torch.rand(g.n_units) for g in ctx.groups]

    class Meddles(Importance):
        def scores(self, ctx):
            next(ctx.model.parameters()).data.add_(1.0)
            return [torch.ones(g.n_units) for g in ctx.groups]

    class Broken:
        @hookimpl
        def prunekit_register_importances(self, register):
            register("wrong-shape", WrongShape)
            register("unseeded", Unseeded)
            register("meddles", Meddles)

    live_plugin(Broken(), "broken-methods")
    for name, rule in (("wrong-shape", "shape"), ("unseeded", "differ between two runs"),
                       ("meddles", "changed the model's weights")):
        with pytest.raises(ConformanceError, match=rule):
            check_method(name)
