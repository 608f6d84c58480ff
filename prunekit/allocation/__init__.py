"""Allocation: a budget becomes how many units each group loses. The contract (``base``), the measured
calibration-loss probe (``probe``), the config plumbing (``plan``), the built-in allocators (``builtin``)."""
