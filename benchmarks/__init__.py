"""prunekit benchmarks: robustness, cost, quality and a torch-pruning peer row, as JSON, markdown and plots."""
