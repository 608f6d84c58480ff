"""The public Python API: prune a model you already hold, evaluate it, save it (docs/api.md).

``prune`` works in place on any model a registered adapter knows, on any device and in any dtype, and
hands the model back in the dtype/device/``requires_grad`` state it came in (scoring runs in the model's dtype
with float32 sums per prunable weight, docs/precision.md).
The CLI (``prunekit run``) and the benchmark harness are built on these functions: load → ``prune`` →
``evaluate`` → ``save``. The stage functions (``build_groups``, ``calibrate``, ``score``, ``select``,
``apply``) are public too, for callers that compose their own experiments. This module only gathers them;
each lives in the folder of its stage, and nothing inside prunekit imports this module.
"""

from __future__ import annotations

from prunekit.core.select import select
from prunekit.eval.suite import evaluate
from prunekit.io.export import save
from prunekit.io.load import load_model
from prunekit.pipeline.prune import MethodInfo, PruneResult, prune, prune_with_config
from prunekit.pipeline.stages import apply, build_groups, calibrate, score

__all__ = ["MethodInfo", "PruneResult", "apply", "build_groups", "calibrate", "evaluate", "load_model", "prune",
           "prune_with_config", "save", "score", "select"]
