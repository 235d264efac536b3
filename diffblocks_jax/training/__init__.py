"""What runs an experiment: the loop, what a config builds, checkpoints, devices, logs, locks."""
