"""The package's layering, checked from the source: no import cycle (function-level imports count, imports
under ``TYPE_CHECKING`` do not), the facade and the benchmarks imported only from above, no study in the wheel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

import prunekit

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prunekit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"


def _imported(path: Path, module: str) -> set[str]:
    """Every prunekit module ``path`` imports at run time (module level or inside functions)."""
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return {n for n in found if n == "prunekit" or n.startswith("prunekit.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "templates" not in p.parts}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported(path, name):
            while imported and imported not in modules:  # `from pkg import name` names a module or an attribute
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        edges[name] = targets
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path of module names, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_only_the_cli_imports_the_benchmarks_and_nothing_imports_the_facade():
    for module, targets in _graph().items():
        if not module.startswith("prunekit.cli"):
            assert not {t for t in targets if t.startswith("prunekit.benchmarks")}, module
        if module not in ("prunekit", "prunekit.api"):
            assert "prunekit.api" not in targets, f"{module} imports the facade (import the stage's own module)"


def test_the_core_imports_no_builtin_plugin():
    for module, targets in _graph().items():
        assert not {t for t in targets if t.startswith("prunekit.builtin")}, f"{module} imports a built-in plugin"


def test_stages_import_only_downwards():
    """Folders low in the pipeline never reach up: core and runtime know nothing of stages above them."""
    above = {"prunekit.core": ("prunekit.pipeline", "prunekit.allocation", "prunekit.eval", "prunekit.io",
                               "prunekit.cli", "prunekit.plugin"),
             "prunekit.runtime": ("prunekit.pipeline", "prunekit.allocation", "prunekit.eval", "prunekit.cli",
                                  "prunekit.plugin", "prunekit.core", "prunekit.importance"),
             "prunekit.data": ("prunekit.pipeline", "prunekit.allocation", "prunekit.eval", "prunekit.cli",
                               "prunekit.plugin")}
    for module, targets in _graph().items():
        for folder, forbidden in above.items():
            if module.startswith(folder + ".") or module == folder:
                bad = {t for t in targets if t.startswith(forbidden)}
                assert not bad, f"{module} imports {sorted(bad)} from above"


def test_no_study_is_installed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not [p for p in setuptools["packages"] if "studies" in p]
    harness = [p for p in (ROOT / "benchmarks").glob("*.py")]
    for path in harness:
        assert "benchmarks.studies" not in path.read_text(), f"{path.name} (installed) imports a study"


# ----------------------------------------------------------------------------- recipes (docs/architecture.md)


@pytest.fixture
def registered():
    """Register plugin objects on the process-wide host for one test, then remove them."""
    from prunekit.plugin.host import get_host

    host, names = get_host(), []

    def register(plugin, name):
        host.pm.register(plugin, name=name)
        names.append(name)

    yield register
    for name in names:
        host.pm.unregister(name=name)


def test_recipe_add_a_method(registered):
    from prunekit import hookimpl
    from prunekit.importance import Importance, ScoringContext

    class Reverse(Importance):
        """Keeps the last units of every group (no options: the base class's empty ``Options``)."""

        def scores(self, ctx: ScoringContext):
            return [torch.arange(g.n_units, dtype=torch.float32) for g in ctx.groups]

    class Plugin:
        @hookimpl
        def prunekit_register_importances(self, register):
            register("reverse", Reverse)

    registered(Plugin(), "recipe-method")
    result = prunekit.prune(make_tiny_llama(4, 4), None, method="reverse", ratio=0.5, allocation={"name": "uniform"})
    mlp = [k for g, k in zip(result.groups, result.kept) if g.kind == "mlp"]
    assert all(k.tolist() == list(range(24, 48)) for k in mlp)  # the last half of the 48 channels


def test_recipe_add_an_allocator(registered):
    from pydantic import BaseModel

    from prunekit import hookimpl

    class Front:
        """Everything from the first groups, as far as the budget goes."""

        class Options(BaseModel):
            pass

        def __init__(self, options):
            self.options = options

        def allocate(self, ctx):
            counts = [0] * len(ctx.groups)
            for i in range(len(ctx.groups)):
                for c in ctx.feasible(i):
                    if ctx.removed_params(counts[:i] + [c] + counts[i + 1:]) <= ctx.budget.params:
                        counts[i] = c
            return counts

    class Plugin:
        @hookimpl
        def prunekit_register_allocators(self, register):
            register("front", Front)

    registered(Plugin(), "recipe-allocator")
    result = prunekit.prune(make_tiny_llama(4, 4), None, method="magnitude", ratio=0.25, allocation={"name": "front"})
    removed = [g.n_units - len(k) for g, k in zip(result.groups, result.kept)]
    assert result.allocation["allocator"] == "front" and removed[0] > 0 and removed[-1] == 0


def test_recipe_add_an_adapter(registered):
    from prunekit import hookimpl
    from prunekit.adapters.llama import LlamaAdapter

    class MyAdapter(LlamaAdapter):
        """A LLaMA-shaped family under its own model type."""

        model_types = ("my-llama",)

    class Plugin:
        @hookimpl
        def prunekit_register_adapters(self, register):
            register(MyAdapter)

    registered(Plugin(), "recipe-adapter")
    model = make_tiny_llama(4, 2)
    model.config.model_type = "my-llama"
    prunekit.prune(model, None, method="magnitude", ratio=0.5, allocation={"name": "uniform"}, layers=(0, 4))
    assert model.model.layers[0].mlp.gate_proj.out_features == 24


def test_recipe_add_a_repair_step(registered):
    from pydantic import BaseModel

    from prunekit import hookimpl

    class ZeroLastDown:
        """Zeroes the last layer's down projection (a visible change, not a useful one)."""

        needs_dense = True

        class Options(BaseModel):
            pass

        def __init__(self, options):
            self.options = options

        def repair(self, ctx):
            with torch.no_grad():
                ctx.model.model.layers[-1].mlp.down_proj.weight.zero_()
            return {"dense_layers": len(ctx.dense.model.layers)}

    class Plugin:
        @hookimpl
        def prunekit_register_repairers(self, register):
            register("zero-last-down", ZeroLastDown)

    registered(Plugin(), "recipe-repair")
    model = make_tiny_llama(4, 2)
    result = prunekit.prune(model, None, method="magnitude", allocation={"name": "uniform"},
                            repair={"name": "zero-last-down"})
    assert not model.model.layers[-1].mlp.down_proj.weight.any()
    assert result.manifest()["repair"]["info"] == {"dense_layers": 4}
