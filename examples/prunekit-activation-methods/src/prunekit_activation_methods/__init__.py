"""Activation-based structured pruning methods for prunekit (an example plugin package)."""
