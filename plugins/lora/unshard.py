"""Putting a module tree back after a sharding engine (FSDP 1/2, DeepSpeed ZeRO-3) trained it.

The engines change the tree they train in place: FSDP2 swaps module classes and makes parameters DTensor
shards, FSDP1 replaces children by wrappers and parameters by flat views, ZeRO-3 empties parameters and
keeps shards on the side; all add hooks. :class:`ModuleTree` records classes, children and hooks before
training and, afterwards, restores them and rebinds every parameter to the full tensor from a gathered
state dict (``accelerator.get_state_dict``), so peft can merge and ``save_pretrained`` can save as usual.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class ModuleTree:
    """Classes, children, hooks and parameter bindings of a module tree, captured before an engine wraps it."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.root = root
        self.modules: list[tuple[torch.nn.Module, type, dict[str, Any], dict[str, OrderedDict]]] = []
        for _, module in root.named_modules(remove_duplicate=True):
            hooks = {name: OrderedDict(getattr(module, name)) for name in HOOK_DICTS if hasattr(module, name)}
            self.modules.append((module, module.__class__, dict(module._modules), hooks))
        self.params: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}  # one entry per shared Parameter
        self.requires_grad: dict[int, bool] = {}
        self.dtypes: dict[int, torch.dtype] = {}  # engines may up- or down-cast (FSDP upcasts, ZeRO casts to bf16)
        for name, param in root.named_parameters(remove_duplicate=False):
            owner, _, leaf = name.rpartition(".")
            self.params.setdefault(id(param), []).append((name, root.get_submodule(owner), leaf))
            self.requires_grad[id(param)] = param.requires_grad
            self.dtypes[id(param)] = param.dtype

    def restore_structure(self) -> None:
        """Original classes, children and hooks (parameters untouched)."""
        for module, cls, children, hooks in self.modules:
            module.__class__ = cls
            module._modules.clear()
            module._modules.update(children)
            for name, saved in hooks.items():
                live = getattr(module, name)
                live.clear()
                live.update(saved)

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Original structure, each parameter a plain ``Parameter`` holding its full tensor from ``state``
        (names as ``root.state_dict()`` had them) in its original dtype; tied parameters stay tied."""
        self.restore_structure()
        missing = []
        for key, bindings in self.params.items():
            tensor = next((state[name] for name, _, _ in bindings if name in state), None)
            if tensor is None:
                missing.append(bindings[0][0])
                continue
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            full = full.detach().to(self.dtypes[key], copy=True)
            param = torch.nn.Parameter(full, requires_grad=self.requires_grad[key])
            for _, module, leaf in bindings:
                module.__dict__.pop(leaf, None)  # FSDP1 may have left a plain attribute in its place
                module._parameters[leaf] = param
        if missing:
            raise RuntimeError(f"recovery: the gathered weights lack {missing[:3]}; for DeepSpeed ZeRO-3 set "
                               f"zero_optimization.stage3_gather_16bit_weights_on_model_save: true")
        device = next(self.root.parameters()).device
        self.root.to(device)  # buffers the engine moved follow the parameters
