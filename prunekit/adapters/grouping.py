"""The default grouper: one attention group and one MLP group per pruned decoder layer.

Which rows/columns belong to a unit comes from the adapter's slots (separate or fused projections,
interleaved heads, norms that shrink with heads). For traceable MLP layouts the coupling is also read
from torch-pruning's DependencyGraph and must agree. Attention never uses the graph: it couples q/k/v/o
channel-for-channel even under GQA (wrong when k/v are narrower than q).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict

from prunekit.adapters.base import Adapter
from prunekit.adapters.layout import Slot, merge_channels, slice_norm
from prunekit.core.groups import CoupledSlice, PruningGroup
from prunekit.errors import UserError
from prunekit.plugin.hookspecs import hookimpl


class GrouperOptions(BaseModel):
    """Which blocks of which layers become pruning groups."""

    model_config = ConfigDict(extra="forbid")

    attention_unit: Literal["heads", "kv_groups"] = "heads"
    prune_attention: bool = True
    prune_mlp: bool = True


def build_dependency_graph(model: torch.nn.Module, adapter: Adapter) -> tp.DependencyGraph:
    """Trace ``model`` once with the adapter's work-arounds (no KV cache, trace-safe rotary).

    Tracing follows autograd, so every parameter needs ``requires_grad`` while it runs.
    """
    was_training, grad_flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        with adapter.tracing(), warnings.catch_warnings():
            # norms: hidden size is never pruned
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=adapter.example_inputs(), forward_fn=adapter.forward_for_trace
            )
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return graph


def _slices(slots: list[Slot], tables: list[torch.Tensor]) -> tuple[tuple[CoupledSlice, ...], tuple[CoupledSlice, ...]]:
    """Coupled slices from slots and their channel tables; slots on one module/dim are merged (fused
    projections: a unit owns rows in several ranges of one Linear). Returns (weights, norm followers)."""
    merged: dict[tuple[str, int, str], list[torch.Tensor]] = {}
    for slot, table in zip(slots, tables):
        merged.setdefault((slot.module, slot.dim, slot.kind), []).append(table)
    weights, norms = [], []
    for (module, dim, kind), parts in merged.items():
        (norms if kind == "norm" else weights).append(CoupledSlice(module, dim, merge_channels(parts)))
    return tuple(weights), tuple(norms)


def mlp_group(model, adapter: Adapter, graph: tp.DependencyGraph | None, layer: int) -> PruningGroup:
    """MLP channels of ``layer`` where the adapter's slots say they are.

    For adapters with ``trace_mlp`` the graph's coupling (whatever depends on the closing Linear's inputs)
    must match the slots, and the group is pruned through the graph.
    """
    shape = adapter.layer_shape(layer)
    slots = adapter.mlp_slots(layer, shape)
    width = shape.intermediate_size
    weights, norms = _slices(slots, [s.channels(width) for s in slots])
    closing = next(s for s in weights if s.dim == 1)
    graph_root = None
    if graph is not None and adapter.trace_mlp:
        _check_graph_coupling(model, graph, closing, {(s.module_name, s.dim) for s in weights}, layer)
        graph_root = (closing.module_name, 1)
    weights = tuple(sorted(weights, key=lambda s: (s.dim, s.module_name)))
    return PruningGroup(
        name=f"layers.{layer}.mlp", kind="mlp", layer=layer, unit="channel", n_units=width,
        slices=weights, graph_root=graph_root, followers=norms,
    )


def _check_graph_coupling(model, graph: tp.DependencyGraph, closing: CoupledSlice, expected: set, layer: int) -> None:
    """Refuse to prune through the graph when it couples other weights than the adapter describes."""
    module_names = {m: n for n, m in model.named_modules()}
    found = set()
    root = model.get_submodule(closing.module_name)
    for dep, _ in graph.get_pruning_group(root, tp.prune_linear_in_channels, idxs=[0]):
        target = dep.target.module
        if isinstance(target, torch.nn.Linear):  # element-wise ops carry the coupling but own no weights
            found.add((module_names[target], 1 if dep.handler == tp.prune_linear_in_channels else 0))
    if found != expected:
        raise RuntimeError(f"layer {layer}: dependency graph coupled {sorted(found)}, expected {sorted(expected)}")


def attention_group(model, adapter: Adapter, layer: int, unit: str) -> PruningGroup:
    """Attention units of ``layer``: whole KV groups, or query heads pruned evenly inside each KV group."""
    shape = adapter.layer_shape(layer)
    n_q, n_kv = shape.num_attention_heads, shape.num_key_value_heads
    per_kv = n_q // n_kv
    slots = adapter.attention_slots(layer, shape)
    if n_q == n_kv or unit == "kv_groups":
        # a KV group owns its KV head and the per_kv query heads that read it
        tables = [s.channels(n_kv) if s.role == "kv" else s.channels(n_q).reshape(n_kv, per_kv * s.width)
                  for s in slots]
        weights, norms = _slices(slots, tables)
        return PruningGroup(f"layers.{layer}.attention", "attention", layer,
                            "head" if n_q == n_kv else "kv_group", n_kv, weights, followers=norms)
    q_slots = [s for s in slots if s.role == "q"]
    weights, norms = _slices(q_slots, [s.channels(n_q) for s in q_slots])
    partition = torch.arange(n_q) // per_kv
    return PruningGroup(f"layers.{layer}.attention", "attention", layer, "head", n_q, weights,
                        partition=partition, followers=norms)


def build_groups(model, adapter: Adapter, layers: range, options: GrouperOptions) -> list[PruningGroup]:
    """The pruning groups of ``layers``; every method scores exactly these objects."""
    graph = build_dependency_graph(model, adapter) if options.prune_mlp and adapter.trace_mlp else None
    groups: list[PruningGroup] = []
    for layer in layers:
        if options.prune_attention:
            groups.append(attention_group(model, adapter, layer, options.attention_unit))
        if options.prune_mlp:
            groups.append(mlp_group(model, adapter, graph, layer))
    if not groups:
        raise UserError("grouper: nothing to prune; enable prune_attention or prune_mlp")
    return groups


def apply_plan(model, adapter: Adapter, groups: list[PruningGroup], kept: list[torch.Tensor]) -> None:
    """Physically remove every unit not in ``kept``; torch-pruning does the surgery.

    Graph-rooted groups (MLP of traceable layouts) are pruned through one dependency graph traced
    before any change; slot-described groups (attention, fused or biased layouts) with torch-pruning's
    exact low-level Linear pruners (biases of pruned rows go with them); norm followers are sliced.
    """
    graph = None
    if any(g.graph_root is not None for g in groups):
        graph = build_dependency_graph(model, adapter)
    for group, keep in zip(groups, kept):
        removed = _complement(keep, group.n_units)
        if removed.numel() == 0:
            continue
        if group.graph_root is not None:
            root_name, root_dim = group.graph_root
            root_slice = next(s for s in group.slices if (s.module_name, s.dim) == group.graph_root)
            handler = tp.prune_linear_in_channels if root_dim == 1 else tp.prune_linear_out_channels
            idxs = group.channels_of(removed, root_slice).tolist()
            graph.get_pruning_group(model.get_submodule(root_name), handler, idxs=idxs).prune()
        else:
            for s in group.slices:
                fn = tp.prune_linear_out_channels if s.dim == 0 else tp.prune_linear_in_channels
                fn(model.get_submodule(s.module_name), group.channels_of(removed, s).tolist())
        for s in group.followers:
            norm = model.get_submodule(s.module_name)
            kept_entries = _complement(group.channels_of(removed, s), norm.weight.shape[0])
            slice_norm(norm, kept_entries)


def _complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


@hookimpl
def prunekit_register_groupers(register) -> None:
    register("blocks", build_groups, options=GrouperOptions)
