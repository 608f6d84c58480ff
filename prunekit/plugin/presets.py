"""How a method preset's defaults and a user's overrides combine into one set of method options.

A preset may set one of two mutually exclusive ways to give a value (an absolute ``rho`` or a scale-free
``rho_relative``); a user who sets the other one explicitly means to replace the preset's choice, not to
be told that "both" are set. Options models declare such pairs in ``alternatives``; the field the user
set wins and the preset's counterpart is dropped. Setting both in the overrides still reaches the
validator, which rejects it.
"""

from __future__ import annotations

from typing import Any


def alternatives(options_cls: type) -> tuple[tuple[str, str], ...]:
    """The (field, field) pairs of ``options_cls`` that are two ways to give one value (may be empty)."""
    return tuple(getattr(options_cls, "alternatives", ()) or ())


def merge_preset(options_cls: type, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``{**defaults, **overrides}`` without the preset's side of any pair whose other side the user set."""
    merged = {**defaults, **overrides}
    for first, second in alternatives(options_cls):
        for mine, theirs in ((first, second), (second, first)):
            if mine in overrides and theirs not in overrides and theirs in defaults:
                merged.pop(theirs, None)
    return merged
