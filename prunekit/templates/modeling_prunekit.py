"""Causal LM of a pruned checkpoint whose modules no longer share one shape (written by prunekit).

The base architecture's own causal-LM class, whose ``__init__`` resizes the pruned Linear modules (and
sets the module attributes that depend on their width, such as ``num_key_value_groups``) from
``config.prunekit_modules`` before the weights load. Needs only transformers and torch, not prunekit.
"""

import transformers
from torch import nn

from .configuration_prunekit import PrunekitConfig

# prunekit writes the base architecture's causal-LM class here when it saves a checkpoint.
BASE_ARCHITECTURE = "LlamaForCausalLM"


def resize_modules(model: nn.Module, spec: dict) -> None:
    """Replace each listed Linear by one of the stored ``[in_features, out_features]``; set attributes."""
    for name, (fan_in, fan_out) in (spec.get("linear") or {}).items():
        old = model.get_submodule(name)
        new = nn.Linear(fan_in, fan_out, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for name, attributes in (spec.get("attributes") or {}).items():
        module = model.get_submodule(name)
        for key, value in attributes.items():
            setattr(module, key, value)


class PrunekitForCausalLM(getattr(transformers, BASE_ARCHITECTURE)):
    """The base causal LM with per-module widths; loads with ``trust_remote_code=True``."""

    config_class = PrunekitConfig

    def __init__(self, config):
        super().__init__(config)
        resize_modules(self, getattr(config, "prunekit_modules", None) or {})
