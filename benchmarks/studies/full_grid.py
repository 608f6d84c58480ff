"""The cells of the full-test-set evaluation (issues 13 and 14): plain, editable data.

A cell is one pruning configuration: ``config`` holds exactly the fields of
:class:`prunekit.core.config.RunConfig` that ``prunekit.pipeline.prune.prune_with_config`` takes (method,
method_options, ratio, grouper, selection, calibration, allocation); the driver adds the seed. Any
registered allocator or method is therefore a cell without code changes. ``tier`` orders the work
(0 first: what the issues' "must show" needs); ``issue``, ``method``-independent labels (``label``,
and for issue 14 ``allocator`` and ``budget``) are what the summary groups by.

``--grid-file`` replaces this table with a JSON or YAML list of cells in the same form.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from prunekit.builtin.moreau import PAPER
from prunekit.errors import UserError

MLP_ONLY = {"name": "blocks", "options": {"prune_attention": False}}
# the scale-free step/rho settings of the sweep (docs/moreau.md): rho*||grad L|| = 1e-4*||w||, gamma = rho/2
RELATIVE = {"rho_relative": 1e-4, "step_fraction": 0.5}
RESAMPLED = {"resample": True, "iterations": 5, "averaged": 2, "salience": "gradient", **RELATIVE}
# moreau-gs's defaults when these cells were measured (the paper's; today's moreau-gs-paper), spelled out: a
# user-set rho/step replaces the relative counterparts of today's moreau-gs preset (prunekit.plugin.presets)
PAPER_GS = {**PAPER, "resample": False, "salience": "gradient"}
# the measured allocator as the allocation study chose it on PTB validation (docs/benchmarks.md): knapsack
# over all layers, then the local search on the joint probe loss; and the knapsack alone for reference
MEASURED = {"name": "measured", "options": {"kinds": ["attention", "mlp"], "max_excess": 0.2, "search_steps": 40},
            "layers": "all"}
KNAPSACK = {"name": "measured", "options": {"kinds": ["attention", "mlp"], "max_excess": 0.2, "search_steps": 0},
            "layers": "all"}


def _i13(cell_id: str, label: str, tier: int, method: str, options: dict, samples: int) -> dict:
    """An issue-13 cell: ratio 0.25 of the MLP channels of the default layers (4-27), n x 64 PTB-train tokens."""
    return {"id": f"i13/{cell_id}", "issue": "13", "label": label, "tier": tier,
            "config": {"method": method, "method_options": options, "ratio": 0.25, "grouper": MLP_ONLY,
                       "calibration": {"n_samples": samples, "seq_len": 64}}}


ISSUE13: list[dict] = [
    _i13("taylor-10x64", "taylor 10x64 (default)", 0, "taylor", {}, 10),
    _i13("fisher-10x64", "fisher 10x64", 0, "fisher", {}, 10),
    _i13("moreau-gs-ref", "moreau-gs reference settings (T=10)", 0, "moreau-gs", PAPER_GS, 10),
    _i13("moreau-gs-fisher", "moreau-gs T=5 resample rho_rel=1e-4 c=0.5 salience=fisher", 0, "moreau-gs",
         {**RESAMPLED, "salience": "fisher"}, 10),
    _i13("fisher-40x64", "fisher 40x64", 1, "fisher", {}, 40),
    _i13("moreau-gs-resample", "moreau-gs T=5 resample rho_rel=1e-4 c=0.5", 1, "moreau-gs", RESAMPLED, 10),
    _i13("taylor-40x64", "taylor 40x64", 1, "taylor", {}, 40),
    _i13("taylor-100x64", "taylor 100x64", 2, "taylor", {}, 100),
    _i13("moreau", "moreau (plain)", 2, "moreau", {}, 10),
]

# (label, allocation section, tier): today's uniform and the measured allocator are the must-show pair
ALLOCATORS: list[tuple[str, dict, int]] = [
    ("uniform", {"name": "uniform"}, 0),
    ("measured", MEASURED, 0),
    ("uniform-mlp", {"name": "uniform", "options": {"kinds": ["mlp"]}}, 0),
    ("global", {"name": "global"}, 1),
    ("measured-knapsack", KNAPSACK, 2),
]
BUDGETS = (0.158, 0.25)


def _i14(method: str, budget: float, allocator: str, allocation: dict, tier: int) -> dict:
    """An issue-14 cell: ``budget`` of all parameters removed by ``allocator`` from ``method``'s scores."""
    return {"id": f"i14/{method}/{allocator}/{budget:g}", "issue": "14", "label": f"{allocator} {100 * budget:.1f} %",
            "allocator": allocator, "budget": budget, "tier": tier,
            "config": {"method": method, "calibration": {"n_samples": 10, "seq_len": 64},
                       "allocation": {**allocation, "params_removed": budget}}}


ISSUE14: list[dict] = [_i14(m, b, label, alloc, tier) for label, alloc, tier in ALLOCATORS
                       for m in ("taylor", "moreau-gs") for b in BUDGETS]

GRIDS: dict[str, list[dict]] = {"issue13": ISSUE13, "issue14": ISSUE14}


def cells(names: list[str], grid_file: Path | None = None) -> list[dict]:
    """The cells of the named grids (or of ``grid_file``), deep-copied, ids checked for uniqueness."""
    if grid_file is not None:
        try:
            text = grid_file.read_text()
            loaded = json.loads(text) if grid_file.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise UserError(f"--grid-file: cannot read {str(grid_file)!r}: {exc}") from None
        chosen = loaded.get("cells") if isinstance(loaded, dict) else loaded
        if not isinstance(chosen, list) or not all(isinstance(c, dict) and "id" in c and "config" in c
                                                   for c in chosen):
            raise UserError("--grid-file: expected a list of cells, each with 'id' and 'config'")
    else:
        unknown = [n for n in names if n not in GRIDS]
        if unknown or not names:
            raise UserError(f"--grid: unknown {unknown or names}; accepted: {', '.join(GRIDS)}")
        chosen = [c for n in names for c in GRIDS[n]]
    out = copy.deepcopy(chosen)
    ids = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise UserError(f"grid: duplicate cell ids {sorted({i for i in ids if ids.count(i) > 1})}")
    for c in out:
        c.setdefault("tier", 1)
        c.setdefault("issue", "")
        c.setdefault("label", c["id"])
    return out


def run_config(cell: dict[str, Any], seed: int, device: str):
    """The validated :class:`RunConfig` of one cell at one seed (the seed drives calibration and method)."""
    from pydantic import ValidationError

    from prunekit.core.config import RunConfig
    from prunekit.core.validation import format_validation_error

    values = {**cell["config"], "seed": seed, "device": device, "dtype": "float32", "evaluation": {"enabled": False}}
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise UserError(f"cell {cell['id']}: " + format_validation_error("", exc)) from None
