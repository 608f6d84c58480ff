"""The default grouper: one attention group and one MLP group per pruned decoder layer.

MLP coupling (gate/up rows, down columns) is read from torch-pruning's DependencyGraph. Attention
coupling comes from the adapter's head geometry because the graph couples q/k/v/o channel-for-channel
even under GQA (wrong when k/v are narrower than q).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict

from prunekit.adapters.base import Adapter
from prunekit.errors import UserError
from prunekit.groups import CoupledSlice, PruningGroup
from prunekit.hookspecs import hookimpl


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
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # norms: hidden size is never pruned
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=adapter.example_inputs(), forward_fn=adapter.forward_for_trace
            )
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return graph


def mlp_group(model, adapter: Adapter, graph: tp.DependencyGraph, layer: int) -> PruningGroup:
    """MLP channels of ``layer``; the coupled layers are whatever the graph says depends on down_proj's inputs."""
    names = adapter.mlp_names(layer)
    down = model.get_submodule(names.down)
    width = down.in_features
    module_names = {m: n for n, m in model.named_modules()}
    slices = []
    for dep, _ in graph.get_pruning_group(down, tp.prune_linear_in_channels, idxs=[0]):
        target = dep.target.module
        if not isinstance(target, torch.nn.Linear):
            continue  # element-wise ops carry the coupling but own no weights
        dim = 1 if dep.handler == tp.prune_linear_in_channels else 0
        slices.append(CoupledSlice(module_names[target], dim, torch.arange(width).unsqueeze(1)))
    expected = {(names.gate, 0), (names.up, 0), (names.down, 1)}
    found = {(s.module_name, s.dim) for s in slices}
    if found != expected:
        raise RuntimeError(f"layer {layer}: dependency graph coupled {sorted(found)}, expected {sorted(expected)}")
    slices.sort(key=lambda s: (s.dim, s.module_name))
    return PruningGroup(
        name=f"layers.{layer}.mlp", kind="mlp", layer=layer, unit="channel", n_units=width,
        slices=tuple(slices), graph_root=(names.down, 1),
    )


def attention_group(model, adapter: Adapter, layer: int, unit: str) -> PruningGroup:
    """Attention units of ``layer``: whole KV groups, or query heads pruned evenly inside each KV group."""
    names, shape, hd = adapter.attention_names(layer), adapter.layer_shape(layer), adapter.head_dim
    n_q, n_kv = shape.num_attention_heads, shape.num_key_value_heads
    per_kv = n_q // n_kv
    q_heads = torch.arange(n_q * hd).view(n_q, hd)  # channels of each query head in q rows / o columns
    if n_q == n_kv or unit == "kv_groups":
        kv_heads = torch.arange(n_kv * hd).view(n_kv, hd)
        q_of_group = q_heads.view(n_kv, per_kv * hd)
        slices = (
            CoupledSlice(names.q, 0, q_of_group), CoupledSlice(names.k, 0, kv_heads),
            CoupledSlice(names.v, 0, kv_heads), CoupledSlice(names.o, 1, q_of_group),
        )
        return PruningGroup(f"layers.{layer}.attention", "attention", layer,
                            "head" if n_q == n_kv else "kv_group", n_kv, slices)
    slices = (CoupledSlice(names.q, 0, q_heads), CoupledSlice(names.o, 1, q_heads))
    partition = torch.arange(n_q) // per_kv
    return PruningGroup(f"layers.{layer}.attention", "attention", layer, "head", n_q, slices,
                        partition=partition)


def build_groups(model, adapter: Adapter, layers: range, options: GrouperOptions) -> list[PruningGroup]:
    """The pruning groups of ``layers``; every method scores exactly these objects."""
    graph = build_dependency_graph(model, adapter) if options.prune_mlp else None
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

    Graph-rooted groups (MLP) are pruned through one dependency graph traced before any change;
    head-geometry groups (attention) with torch-pruning's exact low-level Linear pruners.
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


def _complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


@hookimpl
def prunekit_register_groupers(register) -> None:
    register("blocks", build_groups, options=GrouperOptions)
