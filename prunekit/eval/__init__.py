"""Evaluation: perplexity over evenly spaced windows, zero-shot accuracy through lm-eval, the suite that
combines them with plugin evaluators, the metrics cache and the console tables."""
