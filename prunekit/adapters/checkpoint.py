"""Checkpoint key names: transformers renames some weights on save (GPT-NeoX's ``lm_head`` is written as
``embed_out``); loading a state dict by hand must undo that, or the rebuilt model misses weights."""

from __future__ import annotations

import torch
from torch import nn


def model_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (as ``save_pretrained`` wrote it) with keys renamed to ``model.state_dict()``'s names.

    The map is transformers' own save-time renaming, replayed on one-element tagged tensors so that each
    saved name can be traced back to its module name; many-to-one conversions are left unmapped.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: no save-time renaming
        return state
    names = list(model.state_dict())
    tagged = {name: torch.tensor([float(i)]) for i, name in enumerate(names)}
    try:
        saved = revert_weight_conversion(model, tagged)
    except Exception:  # an unusual conversion: load under the saved names
        return state
    to_model = {}
    for saved_name, tag in saved.items():
        if isinstance(tag, torch.Tensor) and tag.numel() == 1:
            to_model[saved_name] = names[int(tag.item())]
    return {to_model.get(k, k): v for k, v in state.items()}
