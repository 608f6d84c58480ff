"""Turning pydantic validation errors into one-line user errors that name the field."""

from __future__ import annotations

import types
from typing import Any

from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

from prunekit.errors import UserError


def format_validation_error(prefix: str, exc: ValidationError) -> str:
    """One line: which field is wrong and why (pydantic's message, without the traceback)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{prefix}{loc}: {err['msg']}")
    return "; ".join(parts)


def validate_options(model_cls: type[BaseModel], values: dict, prefix: str) -> BaseModel:
    """Build an options model, turning validation errors into a one-line :class:`UserError`; a quoted number
    (``"0.3"`` for a float option) is refused rather than converted."""
    check_quoted_numbers(model_cls, values, prefix)
    try:
        return model_cls(**values)
    except ValidationError as exc:
        raise UserError(format_validation_error(prefix, exc)) from None


def check_tokenizer_fits(model: Any, tokenizer: Any, source: object = "the model") -> None:
    """Refuse a tokenizer whose ids reach past the model's input embedding (an IndexError at the first such
    token otherwise): one line naming both sizes."""
    if tokenizer is None or not hasattr(model, "get_input_embeddings"):
        return
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if isinstance(rows, int) and size > rows:
        raise UserError(f"tokenizer: the tokenizer of {source} has {size} tokens but the model's input embedding has "
                        f"{rows} rows, so token ids {rows}..{size - 1} cannot be looked up; use the tokenizer saved "
                        f"with this model (or resize the embedding with model.resize_token_embeddings)")


# ------------------------------------------------------------------------------------------- strict numbers


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types an annotation accepts (Optional, unions, Annotated and containers' items unwrapped)."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    if origin is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_leaf_types(a) for a in typing.get_args(annotation)))
    return {annotation}


def _item_types(annotation: Any) -> set[Any]:
    """The types the items of a list/tuple/set annotation accept (empty for anything else)."""
    import typing

    out: set[Any] = set()
    for leaf in _leaf_types(annotation) | {annotation}:
        if typing.get_origin(leaf) in (list, tuple, set, frozenset):
            out |= set().union(*(_leaf_types(a) for a in typing.get_args(leaf) if a is not Ellipsis))
    return out


def _wants_number(accepted: set[Any]) -> bool:
    """A number or a flag is wanted and text is not: int, float or bool, and no str, path or Any among them."""
    from pathlib import Path

    return bool(accepted & {int, float, bool}) and not accepted & {str, Path, Any, object}


def quoted_number(annotation: Any, value: Any) -> str | None:
    """Why ``value`` is refused for a field typed ``annotation``: text (``"0.3"``, ``"true"``) where a number or a
    flag is wanted, also inside a list. pydantic would convert it; a config file's quoted number is refused so
    that what is read is what was written (None: not quoted text)."""
    accepted = _leaf_types(annotation)
    if isinstance(value, str) and _wants_number(accepted):
        wanted = "true or false" if not accepted & {int, float} else "a number"
        return f"expected {wanted}, not the text {value!r} (write it without quotes)"
    if isinstance(value, (list, tuple)) and _wants_number(_item_types(annotation)):
        texts = [v for v in value if isinstance(v, str)]
        if texts:
            return f"expected numbers, not the text {texts[0]!r} (write it without quotes)"
    return None


class StrictNumbers(BaseModel):
    """A config section whose numbers and flags must be written as numbers and flags, never as quoted text."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_quoted_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        problem = quoted_number(field.annotation, value) if field is not None else None
        if problem:
            raise ValueError(problem)
        return value


def check_quoted_numbers(model_cls: type[BaseModel], values: dict, prefix: str) -> None:
    """:func:`quoted_number` for the fields of an options model that is not a :class:`StrictNumbers` (a plugin's)."""
    if not isinstance(values, dict) or issubclass(model_cls, StrictNumbers):
        return
    for key, value in values.items():
        field = model_cls.model_fields.get(key)
        problem = quoted_number(field.annotation, value) if field is not None else None
        if problem:
            raise UserError(f"{prefix}{key}: {problem}")
