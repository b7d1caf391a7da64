"""Training: the explicit loop, optimiser and schedule, checkpoints."""
