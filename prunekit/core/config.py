"""The configuration of one run: pydantic models, unknown fields forbidden, loaded from YAML/TOML + flags."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunekit.core.component_config import GrouperConfig
from prunekit.core.evaluation import EvalSpec
from prunekit.core.gguf_types import GGUF_BLOCKS
from prunekit.core.validation import StrictNumbers
from prunekit.data.sources import SOURCES, check_source
from prunekit.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli (a conditional dependency in pyproject.toml)
    import tomli as tomllib

SEED_MAX = 2**32 - 1  # what numpy, torch and random all accept
MAX_SAMPLES = 100_000  # calibration windows; more cannot be held in memory for any model worth pruning


class _Strict(StrictNumbers):
    """Unknown keys, NaN/Inf and quoted numbers (``ratio = "0.3"``) refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SelectionConfig(_Strict):
    """Which layers are pruned and how units are ranked."""

    scope: Literal["local", "global"] = "local"
    layers: tuple[int, int] | None = Field(
        default=None,
        description="[start, end) decoder layers to prune; default keeps the first 4/32 and last 2/32 of the depth")
    round_to: int = Field(default=1, ge=1, description="keep MLP widths a multiple of this")


class CalibrationConfig(_Strict):
    """Text the gradient-based methods estimate importance on."""

    source: str = Field(default="ptb", description=f"one of {', '.join(SOURCES)}, a local text file or "
                                                      "folder of *.txt files, or a mixture (0.7*pd-books+0.3*ptb)")
    n_samples: int = Field(default=10, ge=1, le=MAX_SAMPLES)
    seq_len: int = Field(default=64, ge=2, description="tokens per window; at most the model's context length")
    batch_size: int = Field(
        default=2, ge=1, description="sequences per forward pass; the gradient is the same for any split "
                                     "(losses weighted by share), so this only trades activation memory for speed")
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX,
                             description="which windows are drawn; default (None): the run's seed")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute layer activations in the backward pass (less calibration memory, "
                                   "~1/3 more time; same gradient)")

    @field_validator("source")
    @classmethod
    def _named_or_local(cls, v: str) -> str:
        """A named source, an existing local file / folder (``~`` expanded), or a mixture of them."""
        return check_source(v)


class AllocationConfig(_Strict):
    """Where the removal goes: an allocator plugin, its options, and the budget as a parameter fraction."""

    name: str = "measured"
    options: dict[str, Any] = Field(default_factory=dict)
    params_removed: float | None = Field(
        default=None, gt=0, lt=1, description="fraction of ALL model parameters to remove (met from below); "
                                              "default: what `ratio` removes per layer")
    cache: bool = Field(default=True, description="reuse a measuring allocator's result from prunekit's cache when "
                                                  "the same model, scores and budget were allocated before "
                                                  "(prunekit run only; --no-allocation-cache: probe again)")
    layers: Literal["default", "all"] | None = Field(
        default=None, description="all: every layer becomes a group and the allocator decides which to touch; "
                                  "default: LLM-Pruner's range; unset: the allocator's own choice")


class RecoveryConfig(_Strict):
    """Optional fine-tuning after pruning (``none`` or a registered trainer such as ``lora``)."""

    method: str = "none"
    options: dict[str, Any] = Field(default_factory=dict)


class RepairConfig(_Strict):
    """Weight repair after pruning, before recovery (``none`` or a registered repair such as ``bias``, ``refit``)."""

    name: str = "none"
    options: dict[str, Any] = Field(default_factory=dict)




class ExportConfig(_Strict):
    """Serving formats written into the output folder beside the checkpoint."""

    gguf: Literal["f32", "f16", "q8_0", "q4_0"] | None = Field(
        default=None, description="also write model-TYPE.gguf for llama.cpp (docs/gguf.md); q8_0 and q4_0 keep MLP "
                                  "widths a multiple of 32 (selection.round_to) unless round_to is set")


class EvaluationConfig(EvalSpec):
    """What to measure before and after pruning (the quick default); ``enabled: false`` skips it.

    A run's quick evaluation is perplexity only: zero-shot accuracy on a sample fair enough to mean something
    costs minutes per model on CPU, twice per run (docs/evaluation.md); name the tasks to have it.
    """

    zero_shot: list[str] = Field(default_factory=list, description="zero-shot tasks to run before and after "
                                                                    "pruning (none by default: docs/evaluation.md)")
    enabled: bool = True
    cache: bool = Field(default=True,
                        description="reuse the dense model's 'before' metrics from prunekit's cache when this model "
                                    "was evaluated alike before (--no-eval-cache: recompute)")


class RunConfig(_Strict):
    """Everything one ``prunekit run`` needs; the resolved copy is written to run.json."""

    method: str = "moreau-gs"
    method_options: dict[str, Any] = Field(default_factory=dict)
    model: str | None = Field(default=None, description="hub id or local path; default: the embedded SmolLM2-135M")
    output: Path | None = None
    overwrite: bool = False
    ratio: float = Field(default=0.25, gt=0, lt=1)
    seed: int = Field(default=42, ge=0, le=SEED_MAX, description="drives everything random in the run")
    device: str = Field(default="cpu", description="cpu, cuda or cuda:N (one device; see device_map for several)")
    device_map: str | dict[str, int | str] | None = Field(
        default=None, description="accelerate placement: auto, balanced, balanced_low_0, sequential or module -> "
                                  "device (cpu, disk, cuda:N, N) as a mapping or JSON (docs/devices.md)")
    max_memory: str | dict[str | int, int | str] | None = Field(
        default=None, description="memory per device for device_map, e.g. 0=70GiB,1=70GiB,cpu=200GiB or a mapping")
    offload_folder: Path | None = Field(default=None, description="where accelerate offloads modules mapped to disk")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compute_dtype: Literal["model", "float32"] = Field(
        default="model", description="scoring precision: model (the load dtype, float32 gradient sums per weight) "
                                     "or float32 (the model cast up for scoring and restored bit for bit)")
    stability: int = Field(default=1, ge=1, description="score K calibration resamples, report their agreement, "
                                                         "prune with the consensus (1: one plain scoring)")
    grouper: GrouperConfig = Field(default_factory=GrouperConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    repair: RepairConfig = Field(default_factory=RepairConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _engine_widths(self) -> RunConfig:
        """A quantized GGUF export needs MLP widths its block divides: round_to follows unless the user set it."""
        block = GGUF_BLOCKS.get(self.export.gguf or "", 1)
        if block > 1 and "round_to" not in self.selection.model_fields_set:
            self.selection = self.selection.model_copy(update={"round_to": block})
        return self

    @property
    def calibration_seed(self) -> int:
        """The calibration sample's seed: ``calibration.seed`` when set, else the run's ``seed``."""
        return self.seed if self.calibration.seed is None else self.calibration.seed

    @field_validator("output", "model", "offload_folder", mode="before")
    @classmethod
    def _expand_home(cls, v: Any, info: Any) -> Any:
        """``~/x`` means the home folder here too (YAML/TOML values and quoted flags are not shell-expanded)."""
        if isinstance(v, (str, Path)) and str(v).startswith("~"):
            from prunekit.runtime.paths import expand_path

            try:
                return type(v)(expand_path(v, info.field_name))
            except UserError as exc:
                raise ValueError(str(exc).partition(": ")[2]) from None
        return v

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        from prunekit.runtime.devices import device_problem

        if device_problem(v):
            raise ValueError(device_problem(v))
        return v

    @field_validator("device_map")
    @classmethod
    def _device_map_known(cls, v: Any) -> Any:
        from prunekit.runtime.devices import parse_device_map

        return parse_device_map(v)

    @field_validator("max_memory")
    @classmethod
    def _max_memory_known(cls, v: Any) -> Any:
        from prunekit.runtime.devices import parse_max_memory

        return parse_max_memory(v)

    @field_validator("selection")
    @classmethod
    def _layers_ordered(cls, v: SelectionConfig) -> SelectionConfig:
        if v.layers is not None and not (0 <= v.layers[0] < v.layers[1]):
            raise ValueError("layers must be [start, end) with 0 <= start < end")
        return v


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or TOML file as a dict; malformed files are a :class:`UserError`."""
    if not path.is_file():
        raise UserError(f"config: file not found: {path}")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise UserError(f"config: {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"config: {path} is malformed: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise UserError(f"config: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"config: cannot read {path} ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"config: {path} must hold a mapping at the top level")
    return data


def resolve_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """File values, then flags on top (flags set to None are 'not given')."""
    merged = dict(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**merged)
    except ValidationError as exc:
        from prunekit.core.validation import format_validation_error

        raise UserError(format_validation_error("", exc)) from None


def unknown_keys(data: Any, model_cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Keys of a config file's ``data`` that ``model_cls`` (a run config by default) has no field for, nested
    sections included, as dotted paths; the values are not checked."""
    import typing

    if not isinstance(data, dict):
        return []
    found = []
    for key, value in data.items():
        field = model_cls.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            found.append(f"{prefix}{key}")
            continue
        for leaf in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(leaf, type) and issubclass(leaf, _Strict | EvalSpec):  # sections with a closed key set
                found += unknown_keys(value, leaf, f"{prefix}{key}.")
                break
    return found
