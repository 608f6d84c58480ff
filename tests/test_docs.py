"""Every hook is documented (the datasette rule) and the README opens with the two set-up commands."""

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
