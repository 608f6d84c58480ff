"""One-off studies and GPU-run scripts behind the measured figures in docs/; run from a checkout, not installed."""
