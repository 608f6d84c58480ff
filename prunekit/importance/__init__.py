"""Importance: the contract every method implements (``base``: :class:`Importance`, :class:`ScoringContext`,
gradient and Fisher accumulation), activation statistics, scoring precision and non-finite checks."""

from prunekit.importance.base import (
                                      Importance,
                                      Options,
                                      ScoringContext,
                                      accumulate_gradients,
                                      check_finite,
                                      fisher_diagonal,
)

__all__ = ["Importance", "Options", "ScoringContext", "accumulate_gradients", "check_finite", "fisher_diagonal"]
