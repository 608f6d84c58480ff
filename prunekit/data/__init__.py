"""Text and tokens: named sources (``sources``), the user's own files (``local``), the token cache (``tokens``)
and seeded calibration resampling (``sampling``). The names plugins use are re-exported here."""

from prunekit.data.sources import SOURCES, calibration_batches, load_text, recovery_texts, token_ids
from prunekit.data.text import Text

__all__ = ["SOURCES", "Text", "calibration_batches", "load_text", "recovery_texts", "token_ids"]
