"""Causal LM of a pruned checkpoint whose modules no longer share one shape (written by prunekit).

The base architecture's own causal-LM class, whose ``__init__`` resizes the pruned modules from
``config.prunekit_modules`` before the weights load: Linear layers, other parameters and buffers whose
shape changed (norm weights that shrink with heads), module attributes that depend on a width (such as
``num_key_value_groups``) and per-module config views (layers that read their widths from the config).
It keeps the base class's checkpoint key names (transformers' load/save renames, e.g. GPT-NeoX's
``embed_out``). Needs only transformers and torch, not prunekit.
"""


import torch
import transformers
from torch import nn

from .configuration_prunekit import PrunekitConfig

# prunekit writes the base architecture's causal-LM class here when it saves a checkpoint.
BASE_ARCHITECTURE = "LlamaForCausalLM"


class LayerConfigView:
    """A module's view of the shared config with its own widths, for modules that read widths from the
    config at forward time (Phi-3 slices its fused qkv output at ``config.num_attention_heads * head_dim``)."""

    def __init__(self, base: object, **overrides: object):
        self._base, self._overrides = base, overrides

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") or name in ("_base", "_overrides"):
            raise AttributeError(name)
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._base, name)

    @property
    def base(self) -> object:
        return self._base

    @property
    def overrides(self) -> dict:
        return dict(self._overrides)


def _resize_tensor(model: nn.Module, name: str, shape: list) -> None:
    """Give parameter or buffer ``name`` the stored ``shape`` (same dtype and device; values load later)."""
    module_name, _, tensor_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, tensor_name)
    new = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
    if tensor_name in module._parameters:
        setattr(module, tensor_name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(tensor_name, new)


def resize_modules(model: nn.Module, spec: dict) -> None:
    """Replace each listed Linear by one of the stored ``[in_features, out_features]``, resize the listed
    parameters/buffers, set attributes and give the listed modules their config views."""
    for name, (fan_in, fan_out) in (spec.get("linear") or {}).items():
        old = model.get_submodule(name)
        new = nn.Linear(fan_in, fan_out, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for name, shape in (spec.get("tensors") or {}).items():
        _resize_tensor(model, name, shape)
    for name, attributes in (spec.get("attributes") or {}).items():
        module = model.get_submodule(name)
        for key, value in attributes.items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
    for name, views in (spec.get("config_views") or {}).items():
        module = model.get_submodule(name)
        for attr, overrides in views.items():
            base = getattr(module, attr)
            setattr(module, attr, LayerConfigView(base.base if isinstance(base, LayerConfigView) else base,
                                                  **overrides))


def keep_base_key_names(cls: type) -> None:
    """Register the base class's checkpoint conversions (renames such as GPT-NeoX's ``embed_out`` →
    ``lm_head``) under ``cls``'s name: transformers skips its built-in mappings for custom-code classes."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # transformers without load-time key conversions
        return
    conversions = get_checkpoint_conversion_mapping(BASE_ARCHITECTURE) or []
    register_checkpoint_conversion_mapping(cls.__name__, conversions, overwrite=True)


class PrunekitForCausalLM(getattr(transformers, BASE_ARCHITECTURE)):
    """The base causal LM with per-module widths; loads with ``trust_remote_code=True``."""

    config_class = PrunekitConfig

    def __init__(self, config):
        super().__init__(config)
        # Every checkpoint's class has this one name: register this base's conversions before the
        # weights load (from_pretrained builds the model first) and before a save reverts them.
        keep_base_key_names(type(self))
        resize_modules(self, getattr(config, "prunekit_modules", None) or {})
