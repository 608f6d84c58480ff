"""Seeded calibration samplers: draw k of a run's calibration text, so methods and stability checks can resample.

Draw 0 is the run's own calibration sample (same seed); draw k >= 1 uses a seed derived from (seed, k)
by a hash, stable across runs and platforms. A sampler is a plain callable ``draw -> (batches,
provenance)``; :class:`prunekit.importance.base.ScoringContext` carries one and records what was drawn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch


def derived_seed(seed: int, draw: int) -> int:
    """The calibration seed of draw ``draw`` (the seed itself for draw 0), a 63-bit integer otherwise."""
    if draw == 0:
        return seed
    digest = hashlib.blake2b(f"calibration:{seed}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class CalibrationSampler:
    """Fresh calibration samples of the run's size from the run's source, one seeded draw at a time."""

    tokenizer: Any
    source: str
    n_samples: int
    seq_len: int
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, tokenizer: Any, config: Any) -> "CalibrationSampler":
        """The sampler of a :class:`prunekit.core.config.RunConfig`'s ``calibration`` section."""
        c = config.calibration
        return cls(tokenizer, c.source, c.n_samples, c.seq_len, c.batch_size, config.calibration_seed)

    def __call__(self, draw: int) -> tuple[list[torch.Tensor], dict]:
        """Batches of draw ``draw`` and their provenance (seed and window starts) for run.json."""
        from prunekit.data.sources import calibration_batches

        seed = derived_seed(self.seed, draw)
        ids, info = calibration_batches(self.tokenizer, self.source, self.n_samples, self.seq_len, seed)
        return list(ids.split(self.batch_size)), {"seed": seed, "starts": info["starts"]}

    def child(self, draw: int) -> "CalibrationSampler":
        """A sampler whose draw 0 is this one's draw ``draw`` (its later draws are distinct from ours)."""
        return CalibrationSampler(self.tokenizer, self.source, self.n_samples, self.seq_len, self.batch_size,
                                  derived_seed(self.seed, draw))


@dataclass(frozen=True)
class RandomTokenSampler:
    """Uniform random token ids shaped like given calibration batches, seeded per draw: the sampler for
    random-weight models in tests and benchmarks, where there is no text to draw from."""

    vocab: int
    shapes: tuple[tuple[int, ...], ...]  # the shape of each batch
    seed: int = 0

    @classmethod
    def like(cls, batches: list[torch.Tensor], vocab: int, seed: int = 0) -> "RandomTokenSampler":
        """Draws with the batch shapes of ``batches``."""
        return cls(vocab, tuple(tuple(b.shape) for b in batches), seed)

    def __call__(self, draw: int) -> tuple[list[torch.Tensor], dict]:
        """Batches of draw ``draw`` and their provenance (the seed; no text, so no window starts)."""
        seed = derived_seed(self.seed, draw)
        gen = torch.Generator().manual_seed(seed)
        batches = [torch.randint(0, self.vocab, shape, generator=gen) for shape in self.shapes]
        return batches, {"seed": seed, "starts": []}
