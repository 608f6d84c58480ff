"""Plain values every stage shares: the run config, pruning groups, budgets, layer ranges, unit selection."""
