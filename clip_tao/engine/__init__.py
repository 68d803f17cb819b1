"""Training loop, optimiser and schedule, checkpoints, devices and precision."""
