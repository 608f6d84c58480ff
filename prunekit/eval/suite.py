"""One evaluation of a model: perplexity, zero-shot accuracy and plugin evaluators, optionally cached.

``evaluate`` is the public API's entry point (``prunekit.evaluate(model, tokenizer, ...)``, docs/api.md);
the measurements themselves live in :mod:`prunekit.eval.perplexity` and :mod:`prunekit.eval.zero_shot`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ValidationError

from prunekit.core.evaluation import EvalSpec
from prunekit.core.validation import check_tokenizer_fits, format_validation_error
from prunekit.errors import UserError
from prunekit.eval.perplexity import perplexity
from prunekit.eval.zero_shot import zero_shot
from prunekit.runtime.modelstate import eval_mode
from prunekit.runtime.quiet import summarize, third_party_output

if TYPE_CHECKING:  # pragma: no cover - typing only
    from prunekit.plugin.registry import Registry

RUN_SWITCHES = ("enabled", "cache")


def plugin_evaluators(spec: EvalSpec, registry: Any | None = None) -> dict[str, Any]:
    """The registered evaluator for each name in ``spec.evaluators`` with its options validated (UserError
    naming the available ones for an unknown name, or the bad field), so a run refuses a typo before loading."""
    if not spec.evaluators:
        return {}
    from prunekit.plugin.registry import get_registry

    registry = registry or get_registry()
    return {name: registry.resolve("evaluators", name, options, f"evaluation.evaluators.{name}.")
            for name, options in spec.evaluators.items()}


def evaluate_model(model: torch.nn.Module, tokenizer: Any, spec: EvalSpec | None = None,
                   progress: bool = True, registry: Any | None = None) -> dict[str, Any]:
    """Perplexity on each requested corpus, zero-shot accuracy and any plugin evaluators, as one
    JSON-ready dict (with the spec)."""
    spec = spec or EvalSpec()
    evaluators = plugin_evaluators(spec, registry)
    check_tokenizer_fits(model, tokenizer)  # ids past the embedding: one line now, not an IndexError mid-way
    started = time.perf_counter()
    # lm-eval's and datasets' warnings, log lines and bars: recorded under third_party_log (--verbose: shown)
    with third_party_output() as chatter:
        ppl = {name: perplexity(model, tokenizer, name, window=spec.ppl_window, batch_size=spec.batch_size,
                                max_windows=spec.ppl_max_windows, progress=progress, split=spec.ppl_split,
                                data_dir=spec.data_dir)
               for name in spec.perplexity}
        shots = zero_shot(model, tokenizer, spec.zero_shot, spec.zero_shot_limit, spec.batch_size,
                          progress=progress) if spec.zero_shot else None
        out = {"spec": spec.model_dump(), "perplexity": ppl, "zero_shot": shots}
        if evaluators:
            with eval_mode(model), torch.no_grad():
                out["evaluators"] = {name: fn(model, tokenizer) for name, fn in evaluators.items()}
            out["evaluator_options"] = {name: fn.describe() for name, fn in evaluators.items()}
    if chatter:
        out["third_party_log"] = summarize(chatter)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def eval_spec(spec: EvalSpec | dict | None = None, **fields: Any) -> EvalSpec:
    """An :class:`prunekit.core.evaluation.EvalSpec` from a spec, a dict and/or keywords, validated (UserError)."""
    if isinstance(spec, EvalSpec) and not fields:
        return spec
    values = {**(spec.model_dump() if isinstance(spec, BaseModel) else dict(spec or {})), **fields}
    try:  # a run's EvaluationConfig adds switches (enabled, cache) that are not evaluation settings
        return EvalSpec(**{k: v for k, v in values.items() if k not in RUN_SWITCHES})
    except ValidationError as exc:
        raise UserError(format_validation_error("evaluation.", exc)) from None


def evaluate(model: torch.nn.Module, tokenizer: Any, spec: EvalSpec | dict | None = None, *, cache: bool = False,
             refresh: bool = False, progress: bool = False, registry: Registry | None = None,
             cache_dir: str | Path | None = None, **fields: Any) -> dict[str, Any]:
    """Perplexity (with standard errors), zero-shot accuracy through lm-eval and plugin evaluators of ``model``.

    ``spec``/``**fields`` are :class:`EvalSpec` settings (default: the quick setting). With ``cache=True``
    the metrics are read from / written to prunekit's cache, keyed by a hash of the model's weights,
    config and tokenizer, the settings and package versions (``refresh=True`` recomputes); the result then
    says so under ``cache``. The model comes back in the mode it came in.
    """
    spec = eval_spec(spec, **fields)
    plugin_evaluators(spec, registry)  # an unknown evaluator fails before any work
    compute = functools.partial(evaluate_model, model, tokenizer, spec, progress=progress, registry=registry)
    if not cache:
        return compute()
    from prunekit.eval.cache import cached_metrics

    settings = {k: v for k, v in spec.model_dump(mode="json").items() if k in EvalSpec.model_fields}
    return cached_metrics(model, tokenizer, settings, compute, root=cache_dir, refresh=refresh)
