"""What to evaluate: the perplexity corpora and zero-shot tasks prunekit supports, and one evaluation's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from prunekit.core.validation import StrictNumbers

PPL_SOURCES = ("wikitext2", "ptb")
QUICK_ZERO_SHOT_EXAMPLES = 200  # per task in a quick evaluation (docs/evaluation.md, "The quick evaluation")


@dataclass(frozen=True)
class ZeroShotTask:
    """One zero-shot task: lm-eval's YAML for it (relative to lm_eval/tasks) and the metric prunekit reports."""

    name: str
    lm_eval_yaml: str
    metric: str


ZERO_SHOT_TASKS: dict[str, ZeroShotTask] = {
    t.name: t
    for t in (
        ZeroShotTask("boolq", "super_glue/boolq/default.yaml", "acc"),
        ZeroShotTask("piqa", "piqa/piqa.yaml", "acc_norm"),
        ZeroShotTask("hellaswag", "hellaswag/hellaswag.yaml", "acc_norm"),
        ZeroShotTask("winogrande", "winogrande/default.yaml", "acc"),
        ZeroShotTask("arc_easy", "arc/arc_easy.yaml", "acc"),
        ZeroShotTask("arc_challenge", "arc/arc_challenge.yaml", "acc_norm"),
        ZeroShotTask("openbookqa", "openbookqa/openbookqa.yaml", "acc_norm"),
    )
}


class EvalSpec(StrictNumbers):
    """What to evaluate. The defaults are the quick setting (minutes on 2 CPU cores for a 135M model);
    ``EvalSpec.full()`` uses every window and example."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    perplexity: list[str] = Field(default_factory=lambda: list(PPL_SOURCES))
    ppl_window: int = Field(128, ge=2)
    ppl_max_windows: int | None = Field(40, ge=1)
    ppl_split: Literal["test", "validation", "valid", "train"] = "test"
    zero_shot: list[str] = Field(default_factory=lambda: list(ZERO_SHOT_TASKS))
    # a fair sample: evenly spaced over each split; 200 examples put a task's standard error near 0.035
    zero_shot_limit: int | None = Field(QUICK_ZERO_SHOT_EXAMPLES, ge=1)
    batch_size: int = Field(8, ge=1)
    data_dir: str | None = None
    evaluators: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="evaluators registered by plugins (`prunekit plugins`) to run too, "
                                          "each with its options")

    @field_validator("perplexity", "zero_shot")
    @classmethod
    def _known(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Only corpora with a test split, and tasks with local data and a reported metric."""
        accepted = PPL_SOURCES if info.field_name == "perplexity" else tuple(ZERO_SHOT_TASKS)
        bad = [v for v in value if v not in accepted]
        if bad:
            raise ValueError(f"{bad} not supported; choose from {', '.join(accepted)}")
        return value

    @classmethod
    def full(cls, **overrides: Any) -> EvalSpec:
        """The full evaluation: every perplexity window and every zero-shot example."""
        return cls(**{"ppl_max_windows": None, "zero_shot_limit": None, **overrides})
