"""Code prunekit writes into per-layer-shape checkpoints (see :mod:`prunekit.io.remote_code`).

The modules are real, importable Python so they are linted and tested like the rest; prunekit copies
them into a checkpoint with the base architecture's class names filled in.
"""
