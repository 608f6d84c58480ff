"""The adapter interface: where a family keeps its layers, projections and head geometry."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn

from prunekit.adapters.layout import Slot


@dataclass(frozen=True)
class LayerShape:
    """The prunable widths of one decoder layer."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AttentionNames:
    """Qualified module names of one attention block."""

    q: str
    k: str
    v: str
    o: str


@dataclass(frozen=True)
class MlpNames:
    """Qualified module names of one gated MLP block."""

    gate: str
    up: str
    down: str


class Adapter:
    """Facts about one architecture family. Subclasses set ``model_types`` and the name templates."""

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- geometry -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def layer_shape(self, i: int) -> LayerShape:
        """Current widths of layer ``i``, read from the modules (correct after pruning too)."""
        a, m = self.attention_names(i), self.mlp_names(i)
        get = self.model.get_submodule
        return LayerShape(
            num_attention_heads=get(a.q).out_features // self.head_dim,
            num_key_value_heads=get(a.k).out_features // self.head_dim,
            intermediate_size=get(m.gate).out_features,
        )

    def attention_names(self, i: int) -> AttentionNames:
        raise NotImplementedError

    def mlp_names(self, i: int) -> MlpNames:
        raise NotImplementedError

    # -- block geometry (what the grouper, apply_plan and rebuild read) --------------------------
    # When True, the MLP coupling is also read from torch-pruning's DependencyGraph, checked against
    # ``mlp_slots`` and pruned through the graph; False for layouts the graph cannot express (fused).
    trace_mlp: ClassVar[bool] = False

    def attention_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        """Where every query head (role ``q``) and KV head (role ``kv``) of layer ``i`` lives at ``shape``."""
        raise NotImplementedError

    def mlp_slots(self, i: int, shape: LayerShape) -> list[Slot]:
        """Where every MLP channel of layer ``i`` lives at ``shape``."""
        raise NotImplementedError

    # -- tracing --------------------------------------------------------------------------------
    def example_inputs(self, seq_len: int = 8) -> torch.Tensor:
        """Input ids for tracing the dependency graph."""
        from prunekit.runtime.devices import input_device

        device = input_device(self.model)  # accelerate's first device when the model is dispatched
        return torch.arange(seq_len, device=device).unsqueeze(0) % self.config.vocab_size

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Context in which torch-pruning may trace the model (work-arounds for known failures)."""
        yield

    def forward_for_trace(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Logits only, no KV cache: a cache tuple in the output breaks torch-pruning's tracer."""
        return model(input_ids=inputs, use_cache=False).logits

    # -- after pruning --------------------------------------------------------------------------
    def sync_config(self) -> list[LayerShape]:
        """Make modules and config agree with the pruned weights; returns per-layer shapes."""
        raise NotImplementedError

    def rebuild(self, shapes: list[LayerShape]) -> None:
        """Resize a freshly built model's layers to ``shapes`` before loading pruned weights."""
        raise NotImplementedError

    # -- export ---------------------------------------------------------------------------------
    #: Module attributes that transformers' modules compute from their widths at construction and read
    #: at run time; a checkpoint's loading code sets those that pruning changed.
    module_attributes: ClassVar[tuple[str, ...]] = (
        "num_heads", "num_key_value_heads", "num_key_value_groups", "intermediate_size", "normalized_shape",
    )

    def module_shapes(self) -> dict:
        """What a checkpoint's own loading code must change in a model built from the saved config.

        ``{"linear": {name: [in_features, out_features]}, "tensors": {name: shape}, "attributes": {name:
        {attr: value}}, "config_views": {name: {attr: overrides}}}``, all empty when every module matches
        the config (plain ``from_pretrained`` loads it). The model is compared with one built from its
        config on the meta device: resized Linears, any other parameter or buffer whose shape differs
        (norm weights that shrink with heads), changed width attributes, and per-module config views
        (:class:`~prunekit.io.templates.modeling_prunekit.LayerConfigView`) whose widths differ from the
        config's. A family that keeps pruned state elsewhere extends this.
        """
        import copy

        from prunekit.adapters.hf import transformers_class
        from prunekit.io.templates.modeling_prunekit import LayerConfigView

        with torch.device("meta"):
            reference = transformers_class(type(self.model))(copy.deepcopy(self.config))
        built = dict(reference.named_modules())
        linear: dict[str, list[int]] = {}
        tensors: dict[str, list[int]] = {}
        attributes: dict[str, dict] = {}
        views: dict[str, dict[str, dict]] = {}
        for name, module in self.model.named_modules():
            ref = built.get(name)
            if ref is None:
                raise ValueError(f"module {name!r} is not in a model built from the config")
            prefix = f"{name}." if name else ""
            if isinstance(module, nn.Linear) and (module.in_features, module.out_features) != (
                    ref.in_features, ref.out_features):
                linear[name] = [module.in_features, module.out_features]
            else:
                tensors.update(_changed_tensors(module, ref, prefix))
            changed = {a: _plain(getattr(module, a)) for a in self.module_attributes
                       if hasattr(module, a) and getattr(module, a) != getattr(ref, a, None)}
            if changed and name not in linear:
                attributes[name] = changed
            own = {a: changed for a, v in vars(module).items() if isinstance(v, LayerConfigView)
                   if (changed := {k: x for k, x in v.overrides.items() if getattr(v.base, k, None) != x})}
            if own:
                views[name] = own
        return {"linear": linear, "tensors": tensors, "attributes": attributes, "config_views": views}


def _plain(value):
    """``value`` as JSON stores it (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def _changed_tensors(module: nn.Module, ref: nn.Module, prefix: str) -> dict[str, list[int]]:
    """The module's own parameters and buffers whose shape differs from ``ref``'s; a non-persistent buffer
    cannot be one (the checkpoint does not hold its values)."""
    out: dict[str, list[int]] = {}
    own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    theirs = dict(ref.named_parameters(recurse=False)) | dict(ref.named_buffers(recurse=False))
    for key, tensor in own.items():
        other = theirs.get(key)
        if other is None or tuple(other.shape) == tuple(tensor.shape):
            continue
        if key in module._non_persistent_buffers_set:
            raise ValueError(f"buffer {prefix}{key} changed shape but is not saved; cannot write loading code for it")
        out[f"{prefix}{key}"] = list(tensor.shape)
    return out
