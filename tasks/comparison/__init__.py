"""Strategy comparison: cells (strategy x budget x seed) on workers, their table, intervals and winner."""
