"""Which decoder layers a run prunes: LLM-Pruner's default range scaled to the depth, or the requested one."""

from __future__ import annotations

from prunekit.errors import UserError


def default_layers(n_layers: int) -> range:
    """LLM-Pruner's default (keep 4 first and 2 last of 32 layers), scaled to the model's depth."""
    first, last = round(4 * n_layers / 32), round(2 * n_layers / 32)
    return range(first, n_layers - last)


def resolve_layers(n_layers: int, requested: tuple[int, int] | None) -> range:
    """The decoder layers to prune: ``requested`` [start, end) checked against the model, or the default."""
    if requested is None:
        return default_layers(n_layers)
    start, end = requested
    if end > n_layers:
        raise UserError(f"selection.layers: [{start}, {end}) is outside the model's {n_layers} layers "
                        f"(accepted: 0 <= start < end <= {n_layers})")
    return range(start, end)
