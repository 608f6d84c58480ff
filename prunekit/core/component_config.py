"""Run-config sections that pick a registered component by name and hand it options.

The options stay a plain dict here: only the registered component's own pydantic model knows its
fields, so they are validated when the run resolves the name (see :meth:`prunekit.plugin.registry.Registry.resolve`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

LEGACY_BLOCKS_KEYS = ("attention_unit", "prune_attention", "prune_mlp")


class GrouperConfig(BaseModel):
    """``grouper: {name: blocks, options: {...}}``: which registered grouper cuts the model into groups."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="blocks", description="a grouper registered by a plugin (`prunekit plugins`)")
    options: dict[str, Any] = Field(default_factory=dict, description="validated by the grouper's options model")

    @model_validator(mode="before")
    @classmethod
    def _legacy_flat_keys(cls, data: Any) -> Any:
        """Older configs wrote the ``blocks`` options flat (``grouper: {prune_mlp: false}``): move them under
        options."""
        if isinstance(data, dict) and data and not {"name", "options"} & set(data) \
                and set(data) <= set(LEGACY_BLOCKS_KEYS):
            return {"name": "blocks", "options": dict(data)}
        if isinstance(data, BaseModel) and not isinstance(data, GrouperConfig):  # a GrouperOptions instance
            return {"name": "blocks", "options": data.model_dump()}
        return data
