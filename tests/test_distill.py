"""``distill`` recovery: the chunked KD loss, the teacher contract in `run` / `prune` / `recover`, what it trains."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import weakref

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, registered_plugin
from test_lora import TINY, pruned_tiny

import prunekit
import prunekit.builtin.distill as distill_module
import prunekit.pipeline.prune as prune_module
from prunekit.builtin.distill import DistillOptions, DistillRecovery, kd_loss, mean_kl, reference_kd_loss, shifted
from prunekit.builtin.lora import batches, encode
from prunekit.cli import main
from prunekit.core.config import RunConfig
from prunekit.data.sources import recovery_texts
from prunekit.errors import UserError
from prunekit.io.export import load_pruned

pytestmark = pytest.mark.usefixtures("one_thread", "distill_plugin")


@pytest.fixture(scope="module")
def distill_plugin():
    """Register prunekit.builtin.distill like its entry point would, unless the entry point already did."""
    with registered_plugin(distill_module, "distill"):
        yield


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _held_out(tokenizer, n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Texts of the default recovery source that are not among the training texts of seed 0 (TINY's 8 examples)."""
    source = DistillOptions().source
    train = set(recovery_texts(source, n=TINY["max_examples"], seed=0))
    texts = [t for t in recovery_texts(source, n=3 * n, seed=1) if t not in train][:n]
    assert len(texts) == n
    return batches(encode(tokenizer, texts, TINY["cutoff_len"]), 4, tokenizer.pad_token_id, list(range(n)))


# ------------------------------------------------------------------ the loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_chunked_loss_and_gradient_equal_the_plain_float32_ones(dtype, ce_weight):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[1, 4:] = -100  # right padding
    labels[2, 2:] = -100
    mask, targets = shifted(labels)
    assert mask.sum() == 6 + 3 + 1 and not mask[:, -1].any()
    student = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype)
    plain = student.detach().clone().requires_grad_(True)
    expected = reference_kd_loss(plain, teacher, mask, targets, temperature=2.0, kl_weight=0.7, ce_weight=ce_weight)
    expected.backward()

    given = teacher.clone()
    loss, kl, ce = kd_loss(student, given, mask, targets, temperature=2.0, kl_weight=0.7, ce_weight=ce_weight,
                           chunk_elements=2 * 50)  # two positions per float32 chunk: five chunks
    loss.backward()

    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 1e-4 * expected.item()
    assert torch.allclose(student.grad.float(), plain.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-3)
    assert student.grad.dtype == dtype and (ce == 0) == (ce_weight == 0)
    assert float(kl) > 0 and torch.all(student.grad[~mask] == 0)  # padding and the last position: no gradient


def test_kl_is_zero_when_the_student_is_the_teacher():
    model, tokenizer = make_tiny_llama(9, 3), make_tiny_tokenizer()
    twin = copy.deepcopy(model)
    assert mean_kl(model, twin, _held_out(tokenizer), temperature=2.0) == 0.0
    # and training towards itself changes nothing: every gradient is zero, so AdamW never moves a weight
    before = _state(model)
    info = DistillRecovery(DistillOptions(**{**TINY, "epochs": 1})).recover(model, tokenizer, RunConfig(), teacher=twin)
    assert info["kl_first_epoch"] == 0.0 and info["loss_first_epoch"] == 0.0
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


# ------------------------------------------------------------------ training


def test_distill_lowers_the_held_out_kl_and_leaves_the_teacher_alone():
    student, teacher, tokenizer = pruned_tiny(), make_tiny_llama(9, 3), make_tiny_tokenizer()  # pruned from it
    held_out = _held_out(tokenizer)
    teacher_before = _state(teacher)
    teacher.train()  # found in train mode with gradients on: used in eval mode without them, and left as found
    before = mean_kl(student, teacher, held_out, temperature=2.0)

    info = DistillRecovery(DistillOptions(**{**TINY, "lr": 3e-3})).recover(student, tokenizer, RunConfig(),
                                                                          teacher=teacher)

    after = mean_kl(student, teacher, held_out, temperature=2.0)
    assert after < 0.75 * before, (before, after)
    assert info["steps"] == 4 and info["kl_last_epoch"] < info["kl_first_epoch"]
    assert info["adapter"] == "lora" and info["temperature"] == 2.0 and info["teacher_dtype"] == "float32"
    assert all(torch.equal(teacher_before[n], t) for n, t in teacher.state_dict().items())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert not teacher.get_decoder()._forward_hooks and not student.get_decoder()._forward_hooks


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_full_trains_every_parameter_and_lora_only_the_projections(adapter):
    student, teacher, tokenizer = pruned_tiny(), make_tiny_llama(9, 3), make_tiny_tokenizer()
    student.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    before = _state(student)
    options = DistillOptions(**{**TINY, "lr": 1e-3, "epochs": 1}, adapter=adapter)
    info = DistillRecovery(options).recover(student, tokenizer, RunConfig(), teacher=teacher)

    changed = {n for n, t in student.state_dict().items() if not torch.equal(before[n], t)}
    projections = {n for n in before if n.rsplit(".", 2)[-2] in options.target_modules}
    if adapter == "full":
        assert changed == set(before)  # embeddings, norms, head and every projection
        assert info["trainable_parameters"] == student.num_parameters()
    else:
        assert changed == projections  # the merged adapters; embeddings, norms and the head untouched
        assert 0 < info["trainable_parameters"] < student.num_parameters() // 3
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags  # restored
    assert {n: t.shape for n, t in student.state_dict().items()} == {n: t.shape for n, t in before.items()}
    assert all(type(m) is torch.nn.Linear for m in student.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_a_failed_run_leaves_the_students_weights_as_they_were(adapter):
    from transformers import TrainerCallback

    class FailAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    student, teacher, tokenizer = pruned_tiny(), make_tiny_llama(9, 3), make_tiny_tokenizer()
    before = _state(student)
    recovery = DistillRecovery(DistillOptions(**{**TINY, "lr": 1e-2, "epochs": 1}, adapter=adapter))
    recovery.callbacks.append(FailAtStep2())
    with pytest.raises(KeyboardInterrupt):
        recovery.recover(student, tokenizer, RunConfig(), teacher=teacher)
    after = student.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(type(m) is torch.nn.Linear for m in student.modules() if isinstance(m, torch.nn.Linear))


def _probe():
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.float32: list[int] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.float32.append(sum(p.numel() for p in model.parameters() if p.dtype == torch.float32))

    return Probe()


def test_bf16_student_and_teacher_train_without_float32_copies():
    student = pruned_tiny().to(torch.bfloat16)
    teacher, tokenizer = make_tiny_llama(9, 3).to(torch.bfloat16), make_tiny_tokenizer()
    seen: list[torch.dtype] = []
    hook = teacher.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    recovery = DistillRecovery(DistillOptions(**{**TINY, "lr": 1e-3}, adapter="full", alpha=0.5, hidden_weight=0.5))
    probe = _probe()
    recovery.callbacks.append(probe)
    info = recovery.recover(student, tokenizer, RunConfig(), teacher=teacher)
    hook.remove()

    assert probe.float32 == [0] * info["steps"]  # full training on the bf16 weights themselves, every step
    assert seen and set(seen) == {torch.bfloat16}  # the teacher ran in its own dtype
    assert info["mixed_precision"] == "bf16" and info["teacher_dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in [*student.parameters(), *teacher.parameters()])
    assert info["loss_last_epoch"] < info["loss_first_epoch"]
    for term in ("kl", "ce", "mse"):  # alpha < 1 adds the LM loss, hidden_weight the hidden-state MSE
        assert 0 < info[f"{term}_first_epoch"] < float("inf") and 0 < info[f"{term}_last_epoch"] < float("inf")
    assert not teacher.get_decoder()._forward_hooks and not student.get_decoder()._forward_hooks


def test_default_learning_rate_depends_on_what_is_trained():
    assert DistillOptions().lr == 1e-3 and DistillOptions(adapter="full").lr == 1e-4
    assert DistillOptions(lr=5e-4).lr == 5e-4 and DistillOptions(adapter="full", lr=1e-5).lr == 1e-5
    assert DistillOptions().model_dump()["lr"] == 1e-3  # run.json records the rate used


def test_a_missing_or_mismatched_teacher_is_a_user_error():
    student, tokenizer = pruned_tiny(), make_tiny_tokenizer()
    with pytest.raises(UserError, match=r"^recovery.options.teacher: distill needs a teacher"):
        DistillRecovery(DistillOptions(**TINY)).recover(student, tokenizer, RunConfig())
    with pytest.raises(UserError, match=r"^recovery.options.teacher: the teacher's vocabulary has 80"):
        DistillRecovery(DistillOptions(**TINY)).recover(student, tokenizer, RunConfig(),
                                                         teacher=make_tiny_llama(9, 3, vocab=80))


# ------------------------------------------------------------------ the teacher in a run


def test_prune_shares_one_dense_copy_between_repair_and_teacher_and_frees_it(monkeypatch):
    copies: list[weakref.ref] = []
    original = prune_module.dense_copy

    def counted(model):
        dense = original(model)
        copies.append(weakref.ref(dense))
        return dense

    monkeypatch.setattr(prune_module, "dense_copy", counted)
    model, tokenizer = make_tiny_llama(9, 3), make_tiny_tokenizer()
    result = prunekit.prune(model, tokenizer, method="magnitude", ratio=0.34, layers=(1, 3),
                            allocation={"name": "uniform"},
                            repair={"name": "bias", "options": {"source": "ptb", "n_samples": 2, "seq_len": 16}},
                            recovery={"method": "distill", "options": {**TINY, "epochs": 1}})
    gc.collect()
    assert len(copies) == 1 and copies[0]() is None  # one copy for both, released once recovery returned
    record = result.manifest()["recovery"]
    assert record["method"] == "distill" and record["provider"] == "prunekit"
    assert record["options"]["temperature"] == 2.0 and record["options"]["adapter"] == "lora"
    assert record["options"]["max_examples"] == TINY["max_examples"]
    assert record["teacher"] == {"source": "dense copy of the model before pruning"}
    assert record["info"]["steps"] == 2 and record["info"]["kl_first_epoch"] > 0
    assert result.manifest()["repair"]["name"] == "bias" and "recover" in result.timings


def _config(path, recovery: str):
    path.write_text("selection:\n  layers: [1, 3]\ncalibration:\n  n_samples: 2\n  seq_len: 16\n" + recovery)
    return str(path)


def test_prunekit_run_with_distill_records_trainer_options_and_teacher(tiny_model_dir, tmp_path):
    options = json.dumps({**TINY, "epochs": 1, "temperature": 1.5, "adapter": "full", "lr": 1e-3})
    config = _config(tmp_path / "d.yaml", f"recovery:\n  method: distill\n  options: {options}\n")
    assert main(["run", "--no-eval", "--method", "magnitude", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "out"), "--config", config]) == 0

    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    record = manifest["recovery"]
    assert record["method"] == "distill" and manifest["config"]["recovery"]["method"] == "distill"
    assert record["options"]["temperature"] == 1.5 and record["options"]["adapter"] == "full"
    assert record["options"]["alpha"] == 1.0 and record["options"]["teacher"] is None
    assert record["teacher"]["source"].startswith("dense copy")
    assert record["info"]["trainable_parameters"] > 0 and "recover" in manifest["timings"]
    dense = load_pruned(tiny_model_dir).state_dict()
    tuned = load_pruned(tmp_path / "out").state_dict()
    assert not torch.equal(dense["model.norm.weight"], tuned["model.norm.weight"])  # full: norms trained too


def test_run_recovery_flag_picks_the_trainer_the_config_gives_options_for(tiny_model_dir, tmp_path):
    options = json.dumps({**TINY, "epochs": 1})
    config = _config(tmp_path / "f.yaml", f"recovery:\n  options: {options}\n")
    assert main(["run", "--no-eval", "--method", "magnitude", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "out"), "--config", config, "--recovery", "distill"]) == 0
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["recovery"]["method"] == "distill" and manifest["recovery"]["info"]["kl_last_epoch"] >= 0


# ------------------------------------------------------------------ the teacher in `prunekit recover`


@pytest.fixture
def pruned_dir(tiny_model_dir, tmp_path):
    """A tiny checkpoint pruned by `prunekit run` (magnitude, layers 1-2)."""
    out = tmp_path / "pruned"
    assert main(["run", "--no-eval", "--method", "magnitude", "--ratio", "0.34", "--model", str(tiny_model_dir),
                 "--output", str(out), "--config", _config(tmp_path / "p.yaml", "")]) == 0
    return out


def _options(**extra) -> list[str]:
    return [arg for k, v in {**TINY, "epochs": 1, **extra}.items() for arg in ("-o", f"{k}={json.dumps(v)}")]


def test_recover_loads_the_teacher_that_run_json_records(pruned_dir, tiny_model_dir, tmp_path, capsys):
    recorded = json.loads((pruned_dir / "run.json").read_text())["model_source"]
    out = tmp_path / "recovered"
    assert main(["recover", str(pruned_dir), "--output", str(out), "--recovery", "distill", *_options()]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["recovery"]["method"] == "distill"
    assert manifest["recovery"]["teacher"] == {"source": recorded, "from": "run.json model_source"}
    assert manifest["recovery"]["info"]["kl_first_epoch"] > 0 and "load_teacher" in manifest["timings"]
    assert manifest["config"]["recovery"]["options"]["temperature"] == 2.0
    assert "recovered" in capsys.readouterr().out
    # -o teacher= names one explicitly; a recovered checkpoint names its dense model through pruned_from
    again = tmp_path / "again"
    assert main(["recover", str(pruned_dir), "--output", str(again), "--recovery", "distill",
                 *_options(teacher=str(tiny_model_dir))]) == 0
    teacher = json.loads((again / "run.json").read_text())["recovery"]["teacher"]
    assert teacher == {"source": str(tiny_model_dir), "from": "recovery.options.teacher"}
    third = tmp_path / "third"
    assert main(["recover", str(out), "--output", str(third), "--recovery", "distill", *_options()]) == 0
    teacher = json.loads((third / "run.json").read_text())["recovery"]["teacher"]
    assert teacher == {"source": recorded, "from": "run.json model_source"}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("model_source"), "records no source model to distill from"),
    (lambda m: m.update(model_source="/no/such/dense"), "/no/such/dense: no such directory"),
])
def test_recover_without_a_teacher_is_refused_before_loading(pruned_dir, tmp_path, capsys, edit, message):
    broken = tmp_path / "broken"
    shutil.copytree(pruned_dir, broken)
    manifest = json.loads((broken / "run.json").read_text())
    edit(manifest)
    (broken / "run.json").write_text(json.dumps(manifest))
    assert main(["recover", str(broken), "--output", str(tmp_path / "o"), "--recovery", "distill", *_options()]) == 2
    err = capsys.readouterr().err
    assert "recovery.options.teacher" in err and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, message", [
    ("temperature=0", "recovery.options.temperature: Input should be greater than 0"),
    ("alpha=1.5", "recovery.options.alpha: Input should be less than or equal to 1"),
    ("hidden_weight=-1", "recovery.options.hidden_weight"),
    ("adapter=half", "recovery.options.adapter: Input should be 'lora' or 'full'"),
    ("teacher=/no/such/model", "recovery.options.teacher: /no/such/model: no such directory"),
    ("tempreature=2", "recovery.options.tempreature: Extra inputs are not permitted"),
])
def test_bad_distill_options_are_one_line_errors(pruned_dir, tmp_path, capsys, option, message):
    assert main(["recover", str(pruned_dir), "--output", str(tmp_path / "o"), "--recovery", "distill",
                 "-o", option]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_lora_fields_with_full_parameters_are_refused(tiny_model_dir, tmp_path, capsys):
    config = _config(tmp_path / "c.yaml", "recovery:\n  method: distill\n  options: {adapter: full, r: 4}\n")
    assert main(["run", "--no-eval", "--method", "magnitude", "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "o"), "--config", config]) == 2
    err = capsys.readouterr().err
    assert "recovery.options.r: " in err and "adapter: full" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.distributed
def test_recover_distill_data_parallel_under_accelerate_launch(pruned_dir, tmp_path):
    """Two gloo processes on the CPU, 4 examples each per step: each loads the teacher from run.json, the main
    process alone writes, and the losses are those of one process taking all 8 examples per step (the loss is
    normalised over the tokens of both processes, as the Trainer does for the LM loss)."""
    import os
    import subprocess
    import sys

    one = tmp_path / "one"
    assert main(["recover", str(pruned_dir), "--output", str(one), "--recovery", "distill",
                 *_options(epochs=2, batch_size=8)]) == 0
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_PROGRESS": "0", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", "0", "-m", "prunekit.cli", "recover", str(pruned_dir),
                           "--output", str(out), "--recovery", "distill", *_options(epochs=2)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "run.json").read_text())
    info, single = manifest["recovery"]["info"], json.loads((one / "run.json").read_text())["recovery"]["info"]
    assert info["processes"] == 2 and info["steps"] == single["steps"] == 2 and info["engine"] == "MULTI_CPU"
    assert info["loss_first_epoch"] == pytest.approx(single["loss_first_epoch"], rel=1e-5)
    assert info["loss_last_epoch"] == pytest.approx(single["loss_last_epoch"], rel=1e-2)
    assert manifest["recovery"]["teacher"]["from"] == "run.json model_source"
    assert done.stdout.count("recovered ") == 1
    load_pruned(out)
