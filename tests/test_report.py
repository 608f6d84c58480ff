"""The before/after table shows the compared figures and hides counts, versions and provenance."""

from prunekit.eval.report import flatten_numbers


def test_flatten_keeps_compared_figures_only():
    metrics = {
        "spec": {"ppl_window": 128},
        "perplexity": {"ptb": {"ppl": 87.1, "n_windows": 826, "nll_mean": 4.47, "data": {"chars": 9}}},
        "zero_shot": {"tasks": {"piqa": {"value": 0.7, "all": {"acc": 0.68}, "n": 50, "version": 1.0}},
                      "mean": 0.47, "limit": 50},
        "seconds": 12.0,
    }
    assert flatten_numbers(metrics) == {"perplexity.ptb.ppl": 87.1, "zero_shot.tasks.piqa.value": 0.7,
                                        "zero_shot.mean": 0.47}


def test_standard_errors_and_noise_marks_in_the_before_after_table():
    from rich.console import Console

    from prunekit.eval.report import flatten_stderr, metrics_table, within_noise

    before = {"perplexity": {"ptb": {"ppl": 20.0, "ppl_stderr": 1.0, "nll_stderr": 0.05}},
              "zero_shot": {"tasks": {"boolq": {"value": 0.24, "stderr": 0.06}}, "mean": 0.469, "mean_stderr": 0.025}}
    after = {"perplexity": {"ptb": {"ppl": 40.0, "ppl_stderr": 2.0, "nll_stderr": 0.05}},
             "zero_shot": {"tasks": {"boolq": {"value": 0.68, "stderr": 0.066}}, "mean": 0.489, "mean_stderr": 0.026}}
    assert flatten_stderr(before) == {"perplexity.ptb.ppl": 1.0, "perplexity.ptb.nll": 0.05,
                                      "zero_shot.tasks.boolq.value": 0.06, "zero_shot.mean": 0.025}
    assert within_noise(0.469, 0.025, 0.489, 0.026) is True  # the "gain": 0.02 < 2 * 0.036
    assert within_noise(20.0, 1.0, 40.0, 2.0) is False
    assert within_noise(1.0, None, 2.0, 0.1) is None
    console = Console(width=200, record=True)
    console.print(metrics_table({"before": before, "after": after}, "t"))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") >= 4}
    assert "(noise)" in rows["zero-shot mean"] and "+0.02" in rows["zero-shot mean"]
    assert "(noise)" not in rows["ptb ppl"] and "20 ± 1" in rows["ptb ppl"]
    assert "(noise)" not in rows["BoolQ"]
