"""Mixtures of text sources: ``"pd-books+ptb"`` (equal shares) or ``"0.7*pd-books+0.3*ptb"``.

Calibration, repair and recovery text can come from several sources, each a named source or a local file /
folder, so a run need not fit one corpus (and its figures on that corpus's test split are not all domain
adaptation). A mixture is drawn part by part: each part gets its share of the samples (largest remainder)
from its own seed, derived from the run's seed and the part's position.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

SYNTAX = "SOURCE+SOURCE (equal shares) or SHARE*SOURCE+SHARE*SOURCE, e.g. 0.7*pd-books+0.3*ptb"


def is_mixture(source: str) -> bool:
    """Whether ``source`` names more than one source (an existing path with a '+' in it is one source)."""
    return "+" in source and not Path(source).expanduser().exists()


def parse_mixture(source: str) -> list[tuple[str, float]]:
    """The parts of a mixture and their shares, which sum to 1; a single source is one part of share 1.
    Raises ValueError (naming the part and the accepted syntax) for an empty part, a repeated source or a
    share that is not a positive number."""
    if not is_mixture(source):
        return [(source, 1.0)]
    parts: list[tuple[str, float]] = []
    for part in source.split("+"):
        share, star, name = part.strip().rpartition("*")
        name = name.strip()
        try:
            weight = float(share) if star else 1.0
        except ValueError:
            raise ValueError(f"{part.strip()!r}: the share before '*' is not a number ({SYNTAX})") from None
        if not name:
            raise ValueError(f"{source!r} has an empty part ({SYNTAX})")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{part.strip()!r}: a share must be a positive number ({SYNTAX})")
        if name in (n for n, _ in parts):
            raise ValueError(f"{name!r} appears twice in {source!r}; give it one share")
        parts.append((name, weight))
    total = sum(w for _, w in parts)
    return [(name, w / total) for name, w in parts]


def split_count(n: int, shares: list[float]) -> list[int]:
    """``n`` items divided by ``shares`` (summing to 1): floors, then the largest remainders get one more
    (ties to the earlier part), so the counts sum to ``n``."""
    exact = [n * s for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def part_seed(seed: int, part: int) -> int:
    """The seed part ``part`` of a mixture draws with: a hash of (seed, part), stable across runs and platforms."""
    digest = hashlib.blake2b(f"mixture:{seed}:{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
