"""What leaves the process: saved checkpoints (``export``), their loading code (``remote_code``, ``templates``),
and the output-folder safety that makes every write all-or-nothing (``safety``)."""
