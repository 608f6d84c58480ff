"""Every hook is documented (the datasette rule), every name the docs cite imports from where they say, and the
README opens with the two set-up commands."""

import importlib
import re
from pathlib import Path

import pytest

import prunekit.plugin.hookspecs as hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("prunekit_"))


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    assert f"### {hook}" in (ROOT / "docs" / "plugins.md").read_text()


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_second():
    blocks = (ROOT / "README.md").read_text().split("```bash\n")[1:3]
    commands = [b.split("\n```")[0].strip() for b in blocks]
    assert "prunekit run --method moreau-gs" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


DOTTED = re.compile(r"`(prunekit(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
IMPORTS = re.compile(r"from (prunekit[a-z_.]*) import ([A-Za-z_, ]+)")


def _resolves(dotted: str) -> bool:
    """``dotted`` names a module, or an attribute of the longest module prefix that imports."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", ["api.md", "plugins.md", "architecture.md", "repair.md"])
def test_every_public_name_in_the_docs_imports_from_where_they_say(page):
    path = ROOT / "docs" / page
    if not path.exists():
        pytest.skip(f"{page} not written")
    text = path.read_text()
    names = set(DOTTED.findall(text))
    names |= {f"{module}.{n.strip()}" for module, listed in IMPORTS.findall(text) for n in listed.split(",")}
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{page} names what does not import: {missing}"
