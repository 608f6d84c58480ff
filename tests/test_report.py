"""The before/after table shows the compared figures and hides counts, versions and provenance."""

from prunekit.report import flatten_numbers


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
