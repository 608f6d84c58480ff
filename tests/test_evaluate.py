"""Perplexity against a hand computation, the evaluation spec, and the offline lm-eval bridge on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from pydantic import ValidationError
from test_data import tiny_tokenizer

import prunekit.core.evaluation as spec_mod
import prunekit.eval.perplexity as ppl_mod
import prunekit.eval.suite as evaluate
import prunekit.eval.zero_shot as zs_mod
import prunekit.runtime.assets as assets
from prunekit.data.sources import Text
from prunekit.errors import UserError

needs_zero_shot_data = pytest.mark.skipif(not assets.zero_shot_data_available(),
                                          reason=f"zero-shot data missing: {assets.ZERO_SHOT_SETUP}")


def tiny_model(vocab: int, seed: int = 0):
    """A random-weight 2-layer LLaMA (hidden 64, 4 heads) matching the tiny tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


@pytest.fixture(scope="module")
def zero_shot_cache(tmp_path_factory):
    """Zero-shot parquet files prepared once into a throw-away cache."""
    root = tmp_path_factory.mktemp("pk-cache")
    assets.prepare_zero_shot_data(root)
    return root


def hand_ppl(model, ids: torch.Tensor, window: int) -> float:
    """exp(mean NLL) window by window, token by token, with log_softmax: the definition, spelled out."""
    nlls = []
    with torch.no_grad():
        for start in range(0, (ids.numel() // window) * window, window):
            chunk = ids[start:start + window]
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
            nlls += [-logp[t, chunk[t + 1]].item() for t in range(window - 1)]
    return math.exp(sum(nlls) / len(nlls))


def test_perplexity_matches_a_hand_computation(model, tok):
    window = 50
    sentence = "the company said it expects to report higher earnings for the third quarter "
    text = sentence * 3
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    assert 2 * window <= ids.numel() < 3 * window  # two windows plus a dropped remainder
    result = ppl_mod.perplexity(model, tok, text, window=window, batch_size=1, progress=False)
    assert (result["n_windows"], result["n_tokens"], result["n_predicted"]) == (2, 100, 98)
    assert result["ppl"] == pytest.approx(hand_ppl(model, ids, window), rel=1e-5)
    batched = ppl_mod.perplexity(model, tok, text, window=window, batch_size=8, progress=True)
    assert batched["ppl"] == pytest.approx(result["ppl"], rel=1e-5)


def test_perplexity_on_a_named_source_with_a_window_cap(model, tok):
    result = ppl_mod.perplexity(model, tok, "ptb", window=32, max_windows=3, progress=False)
    assert result["n_windows"] == 3 and result["data"]["source"] == "ptb" and result["data"]["split"] == "test"
    assert result["tokens_in_split"] > 3 * 32 and 1 < result["ppl"] < 10 * len(tok)


def test_perplexity_restores_training_mode_and_rejects_short_text(model, tok):
    model.train()
    ppl_mod.perplexity(model, tok, Text("a b c " * 20, "custom", "-", "x", "y"), window=8, progress=False)
    assert model.training
    model.eval()
    with pytest.raises(UserError, match="less than one window"):
        ppl_mod.perplexity(model, tok, "too short", window=128, progress=False)
    with pytest.raises(UserError, match="is not a source"):
        ppl_mod.perplexity(model, tok, "wikitext", progress=False)


def test_eval_spec_defaults_validation_and_full():
    spec = spec_mod.EvalSpec()
    assert spec.perplexity == ["wikitext2", "ptb"] and spec.ppl_window == 128
    assert spec.ppl_max_windows == 40 and spec.zero_shot_limit == 200
    assert spec.zero_shot == list(spec_mod.ZERO_SHOT_TASKS)
    from prunekit.core.config import EvaluationConfig

    assert EvaluationConfig().zero_shot == []  # a run's quick evaluation leaves zero-shot out (docs/evaluation.md)
    with pytest.raises(ValidationError, match="expected a number, not the text '40'"):
        spec_mod.EvalSpec(ppl_max_windows="40")
    full = spec_mod.EvalSpec.full(zero_shot=["piqa"])
    assert full.ppl_max_windows is None and full.zero_shot_limit is None and full.zero_shot == ["piqa"]
    with pytest.raises(ValidationError, match="extra"):
        spec_mod.EvalSpec(ppl_windw=64)
    with pytest.raises(ValidationError, match="choose from"):
        spec_mod.EvalSpec(zero_shot=["mmlu"])
    with pytest.raises(ValidationError, match="choose from"):
        spec_mod.EvalSpec(perplexity=["c5"])


def test_unknown_zero_shot_task_is_a_user_error(model, tok):
    with pytest.raises(UserError, match="choose from"):
        zs_mod.zero_shot(model, tok, tasks=["mmlu"])


@needs_zero_shot_data
def test_local_task_yamls_include_lm_eval_and_read_local_parquet(tmp_path, zero_shot_cache):
    from lm_eval.tasks import TaskManager

    files = zs_mod.write_local_tasks(list(spec_mod.ZERO_SHOT_TASKS), tmp_path, zero_shot_cache)
    for name in spec_mod.ZERO_SHOT_TASKS:
        config = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        assert config["include"].endswith(spec_mod.ZERO_SHOT_TASKS[name].lm_eval_yaml)
        assert config["dataset_path"] == "parquet"
        assert config["dataset_kwargs"]["data_files"]["validation"] == str(files[name]["path"])
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["boolq", "hellaswag"])["tasks"]
    boolq, hellaswag = loaded["boolq"], loaded["hellaswag"]
    doc = boolq.validation_docs()[0]
    assert len(boolq.validation_docs()) == 3270 and boolq.doc_to_target(doc) in (0, 1)
    assert boolq.doc_to_text(doc).endswith("?\nAnswer:")
    assert len(hellaswag.validation_docs()) == 10042  # lm-eval's own process_docs ran on the local rows
    assert len(hellaswag.doc_to_choice(hellaswag.validation_docs()[0])) == 4


@needs_zero_shot_data
def test_zero_shot_runs_lm_eval_offline_on_a_tiny_model(model, tok, zero_shot_cache, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(zero_shot_cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = zs_mod.zero_shot(model, tok, tasks=["arc_easy", "winogrande"], limit=2, batch_size=2)
    assert set(result["tasks"]) == {"arc_easy", "winogrande"}
    arc = result["tasks"]["arc_easy"]
    assert arc["metric"] == "acc" and arc["n"] == 2 and arc["split"] == "validation" and arc["version"] is not None
    assert 0.0 <= arc["value"] <= 1.0 and {"acc", "acc_norm"} <= set(arc["all"])
    assert result["mean"] == pytest.approx((arc["value"] + result["tasks"]["winogrande"]["value"]) / 2)
    assert result["lm_eval_version"] and result["limit"] == 2
    # the two examples are the middles of the split's halves, recorded with the result, not the first two
    assert arc["sample"] == {"method": "evenly spaced", "available": 570, "indices": [142, 427]}
    assert result["tasks"]["winogrande"]["sample"]["indices"] == [316, 950]


@needs_zero_shot_data
@pytest.mark.parametrize("limit", [50, 200])
def test_the_quick_sample_of_every_task_is_spread_over_its_split(zero_shot_cache, limit):
    """Every task's quick sample reaches both ends of its split, with no gap wider than one stratum: a fair
    sample of the split, where the first `limit` examples were one corner of it (BoolQ's first 50: 78 % "yes")."""
    files = assets.zero_shot_files(zero_shot_cache)
    sample = zs_mod.fair_sample({t: f["rows"] for t, f in files.items()}, limit)
    assert set(sample) == set(spec_mod.ZERO_SHOT_TASKS)
    for task, chosen in sample.items():
        available, indices = chosen["available"], chosen["indices"]
        stratum = available / limit
        assert chosen["method"] == "evenly spaced" and len(indices) == limit == len(set(indices)), task
        assert indices == sorted(indices) and indices[0] < stratum and indices[-1] >= available - stratum, task
        assert max(b - a for a, b in zip(indices, indices[1:])) <= stratum + 1, task
        halves = sum(i < available / 2 for i in indices)
        assert abs(halves - limit / 2) <= 1, task  # as many from each half of the split
    assert zs_mod.fair_sample({"piqa": 30}, 50)["piqa"] == {"method": "all", "available": 30}


@needs_zero_shot_data
def test_evaluate_model_runs_a_small_spec(model, tok, zero_shot_cache, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(zero_shot_cache))
    spec = spec_mod.EvalSpec(perplexity=["ptb"], ppl_window=32, ppl_max_windows=2, zero_shot=["piqa"],
                             zero_shot_limit=2, batch_size=2)
    result = evaluate.evaluate_model(model, tok, spec, progress=False)
    assert result["perplexity"]["ptb"]["n_windows"] == 2
    assert result["zero_shot"]["tasks"]["piqa"]["metric"] == "acc_norm"
    assert result["spec"] == spec.model_dump()


def test_plugin_evaluators_run_with_their_options(model, tok):
    """An evaluator a plugin registers runs after the built-ins, gets its options, and lands in the result."""
    from prunekit import hookimpl
    from prunekit.plugin.host import build_host
    from prunekit.plugin.registry import Registry

    class CountsParameters:
        @hookimpl
        def prunekit_register_evaluators(self, register):
            register("param-count", lambda m, t, options: {"params": m.num_parameters() * options["scale"],
                                                           "grad_enabled": float(torch.is_grad_enabled())})

    host = build_host()
    host.pm.register(CountsParameters())
    registry = Registry.from_host(host)
    spec = spec_mod.EvalSpec(perplexity=[], zero_shot=[], evaluators={"param-count": {"scale": 2}})
    model.train()
    result = evaluate.evaluate_model(model, tok, spec, progress=False, registry=registry)
    assert result["evaluators"]["param-count"] == {"params": 2 * model.num_parameters(), "grad_enabled": 0.0}
    assert model.training  # evaluated in eval mode, handed back as it came
    model.eval()
    with pytest.raises(UserError, match="unknown name 'param-cuont'; available: param-count"):
        evaluate.evaluate_model(model, tok, spec.model_copy(update={"evaluators": {"param-cuont": {}}}),
                                progress=False, registry=registry)


def test_capped_perplexity_uses_evenly_spaced_windows_with_a_standard_error(model, tok):
    assert ppl_mod.spaced_windows(10, 3) == [1, 5, 8] and ppl_mod.spaced_windows(4, None) == [0, 1, 2, 3]
    assert ppl_mod.spaced_windows(4, 9) == [0, 1, 2, 3] and ppl_mod.spaced_windows(100, 4) == [12, 37, 62, 87]
    window = 16
    result = ppl_mod.perplexity(model, tok, "ptb", window=window, max_windows=5, batch_size=2, progress=False)
    ids = ppl_mod.token_ids(tok, ppl_mod.load_text("ptb", "test"))
    available = ids.numel() // window
    chosen = ppl_mod.spaced_windows(available, 5)
    assert result["window_selection"] == {"method": "evenly spaced", "available": available, "indices": chosen}
    per_window = []
    with torch.no_grad():
        for i in chosen:
            chunk = ids[i * window:(i + 1) * window]
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
            per_window.append(-sum(logp[t, chunk[t + 1]].item() for t in range(window - 1)) / (window - 1))
    mean = sum(per_window) / 5
    se = math.sqrt(sum((v - mean) ** 2 for v in per_window) / 4 / 5)
    assert result["nll_mean"] == pytest.approx(mean, rel=1e-5) and result["nll_stderr"] == pytest.approx(se, rel=1e-4)
    assert result["ppl_stderr"] == pytest.approx(math.exp(mean) * se, rel=1e-4)
