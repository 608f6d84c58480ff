"""A loaded text and its provenance: the value every data source returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Text:
    """A loaded text and where it came from (source, split, variant, location) for run manifests."""

    text: str
    source: str
    split: str
    variant: str
    location: str
    documents: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """Everything but the text itself: what a manifest records about the data used."""
        return {"source": self.source, "split": self.split, "variant": self.variant,
                "location": self.location, "chars": len(self.text)}
