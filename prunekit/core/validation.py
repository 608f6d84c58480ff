"""Turning pydantic validation errors into one-line user errors that name the field."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from prunekit.errors import UserError


def format_validation_error(prefix: str, exc: ValidationError) -> str:
    """One line: which field is wrong and why (pydantic's message, without the traceback)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{prefix}{loc}: {err['msg']}")
    return "; ".join(parts)


def validate_options(model_cls: type[BaseModel], values: dict, prefix: str) -> BaseModel:
    """Build an options model, turning validation errors into a one-line :class:`UserError`."""
    try:
        return model_cls(**values)
    except ValidationError as exc:
        raise UserError(format_validation_error(prefix, exc)) from None
