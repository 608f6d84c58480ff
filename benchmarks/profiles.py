"""Benchmark profiles: how much data, how many windows and which sweeps one run uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prunekit.benchmarks.perturb import PERTURBATIONS
from prunekit.core.config import CalibrationConfig

_CALIBRATION = CalibrationConfig()  # the profiles calibrate like a default run


@dataclass(frozen=True)
class Profile:
    """Every size knob of a benchmark run; ``quick`` fits 2 CPU cores, ``full`` is for a GPU machine."""

    name: str
    calib_source: str = _CALIBRATION.source
    calib_samples: int = _CALIBRATION.n_samples
    calib_seq_len: int = _CALIBRATION.seq_len
    calib_batch: int = _CALIBRATION.batch_size
    calib_seed_offset: int = 1000  # the "other calibration sample" perturbation draws seed + this
    ppl_window: int = 128
    ppl_max_windows: int | None = 20
    ppl_batch: int = 8
    ppl_split: str = "test"
    noise_levels: tuple[float, ...] = (0.001, 0.004, 0.01)
    # bf16 *estimation* is for devices with fast bf16 matmuls: on the 2-core CPU it took 1,042 s for one
    # SmolLM2 taylor gradient (73 s in float32), so the CPU profile leaves it out unless asked for.
    perturbations: tuple[str, ...] = tuple(p for p in PERTURBATIONS if p != "bfloat16-estimation")
    quality_ratios: tuple[float, ...] = (0.1, 0.25, 0.4)
    quality_corpora: tuple[str, ...] = ("ptb", "wikitext2")
    zero_shot_limit: int | None = 20  # examples per task when --zero-shot is given; None = the full sets
    prompt_len: int = 128
    decode_len: int = 32
    speed_repeats: int = 3

    def as_dict(self) -> dict:
        """JSON-ready copy for the run record."""
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "quick": Profile(name="quick"),
    "full": Profile(name="full", ppl_max_windows=None,
                    perturbations=PERTURBATIONS, quality_ratios=(0.1, 0.2, 0.25, 0.3, 0.4, 0.5),
                    zero_shot_limit=None, prompt_len=512, decode_len=128, speed_repeats=5),
}
