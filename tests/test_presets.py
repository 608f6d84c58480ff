"""Method presets and user overrides: a user-set field replaces the preset's alternative to it
(``prunekit.plugin.presets``), so ``-o rho=0.1`` on the relative ``moreau-gs`` preset runs with ρ = 0.1; setting
both sides yourself is still an error; run.json records the options that ran."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from pydantic import BaseModel, model_validator

from prunekit.cli import main
from prunekit.errors import UserError
from prunekit.plugin.presets import merge_preset
from prunekit.plugin.registry import get_registry


class Pair(BaseModel):
    """Two ways to give one value, exclusive when both are set explicitly (as MoreauOptions' pairs)."""

    alternatives: ClassVar[tuple[tuple[str, str], ...]] = (("absolute", "relative"),)
    absolute: float = 1.0
    relative: float | None = None
    other: int = 0

    @model_validator(mode="after")
    def _one(self) -> "Pair":
        if self.relative is not None and "absolute" in self.model_fields_set:
            raise ValueError("set absolute or relative, not both")
        return self


@pytest.mark.parametrize("defaults, overrides, merged", [
    ({"relative": 0.5}, {"absolute": 2.0}, {"absolute": 2.0}),  # the user's absolute replaces the preset's relative
    ({"absolute": 2.0}, {"relative": 0.5}, {"relative": 0.5}),  # and the other way round
    ({"relative": 0.5, "other": 3}, {"other": 4}, {"relative": 0.5, "other": 4}),  # unrelated fields: plain merge
    ({"relative": 0.5}, {"absolute": 2.0, "relative": 0.1}, {"absolute": 2.0, "relative": 0.1}),  # both: kept
    ({}, {"absolute": 2.0}, {"absolute": 2.0}),
])
def test_merge_preset(defaults, overrides, merged):
    assert merge_preset(Pair, defaults, overrides) == merged


def test_merge_without_alternatives_is_a_plain_merge():
    class Plain(BaseModel):
        a: int = 0

    assert merge_preset(Plain, {"a": 1, "b": 2}, {"a": 3}) == {"a": 3, "b": 2}


def test_user_set_absolute_fields_win_over_moreau_gs_relative_preset():
    entry = get_registry().method("moreau-gs")
    o = entry.options({"rho": 0.1})
    assert (o.rho, o.rho_relative, o.step_fraction) == (0.1, None, 0.5)  # γ = 0.5·ρ = 0.05
    o = entry.options({"step": 1e-4})
    assert (o.step, o.step_fraction, o.rho_relative) == (1e-4, None, 1e-4)
    o = entry.options({"step": 1e-4, "rho": 0.1})  # the paper's parametrisation with the preset's other settings
    assert (o.step, o.rho, o.step_fraction, o.rho_relative, o.iterations, o.salience) == (1e-4, 0.1, None, None, 5,
                                                                                           "fisher")
    o = entry.options({"eta_relative": 0.1})
    assert o.eta_relative == 0.1 and o.eta == 5e-6  # eta is not in the preset: nothing dropped
    for both in ({"rho": 0.1, "rho_relative": 1e-4}, {"step": 1e-4, "step_fraction": 0.5},
                 {"eta": 1e-6, "eta_relative": 0.1}):
        with pytest.raises(UserError, match="not both"):
            entry.options(both)


def test_relative_override_on_the_paper_preset():
    """moreau-gs-paper sets rho and step: a user's rho_relative / step_fraction replaces them."""
    entry = get_registry().method("moreau-gs-paper")
    o = entry.options({"rho_relative": 1e-4, "step_fraction": 0.5})
    assert (o.rho_relative, o.step_fraction, o.iterations, o.salience) == (1e-4, 0.5, 10, "gradient")
    assert "rho" not in o.model_fields_set and "step" not in o.model_fields_set


def test_run_json_records_the_override_that_ran(tiny_model_dir, tmp_path, capsys):
    """End to end on a tiny model: -o rho=0.1 on moreau-gs runs with ρ = 0.1, γ = 0.05 and says so in run.json."""
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text("calibration:\n  n_samples: 4\n  seq_len: 16\nallocation:\n  name: uniform\n")
    args = ["run", "--no-eval", "--ratio", "0.34", "--method", "moreau-gs", "--model", str(tiny_model_dir),
            "--output", str(out), "--config", str(config), "-o", "rho=0.1", "-o", "iterations=2", "-o", "averaged=1"]
    assert main(args) == 0, capsys.readouterr().err
    method = json.loads((out / "run.json").read_text())["method"]
    assert method["name"] == "moreau-gs"
    opts, info = method["options"], method["info"]["moreau"]
    assert (opts["rho"], opts["rho_relative"], opts["step_fraction"], opts["resample"], opts["salience"]) == (
        0.1, None, 0.5, True, "fisher")  # the resolved preset plus the user's field
    assert info["rho_effective"] == pytest.approx(0.1) and info["step_effective"] == pytest.approx(0.05)
    assert len(method["info"]["calibration_draws"]) == 1  # step 2 drew fresh text


def test_benchmark_cells_keep_their_meaning():
    """The sweep's and the full grid's "reference settings" cells still run the paper's settings, the
    gradient-salience cells say so, and the sweep's cost count reads the registered preset."""
    from prunekit.benchmarks import sweep
    from prunekit.benchmarks.studies import full_grid

    registry = get_registry()
    paper = registry.method("moreau-gs-paper").options({}).model_dump()
    ref = next(p for p in sweep.GRID if p.label == "moreau-gs reference settings (T=10)")
    assert registry.method(ref.method).options(ref.options).model_dump() == paper and ref.passes() == 10
    cell = next(c for c in full_grid.ISSUE13 if c["id"] == "i13/moreau-gs-ref")["config"]
    assert registry.method(cell["method"]).options(cell["method_options"]).model_dump() == paper
    gradient = next(c for c in full_grid.ISSUE13 if c["id"] == "i13/moreau-gs-resample")["config"]
    assert registry.method("moreau-gs").options(gradient["method_options"]).salience == "gradient"
    chosen = next(c for c in full_grid.ISSUE13 if c["id"] == "i13/moreau-gs-fisher")["config"]
    assert registry.method("moreau-gs").options(chosen["method_options"]) == registry.method("moreau-gs").options({})
    assert (sweep.Point("moreau-gs").passes(), sweep.Point("moreau-gs-paper").passes()) == (6, 10)
