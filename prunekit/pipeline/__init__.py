"""The stages of one run in order: plan and checks, stages (groups, calibrate, score, apply), stability,
prune (the whole straight line), recover, and ``run`` (the CLI's run: evaluate, prune, save)."""
