"""Facts about transformers' own classes that adapters and saved checkpoints build on."""

from __future__ import annotations


def transformers_class(cls: type) -> type:
    """The first class in ``cls``'s MRO that transformers itself defines (a loaded remote class's base)."""
    for base in cls.__mro__:
        if base.__module__.startswith("transformers."):
            return base
    raise ValueError(f"{cls.__name__} is not built on a transformers class; cannot write loading code for it")
