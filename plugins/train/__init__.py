"""Cluster training through torchrun (the trainer, checkpoints, the launcher) and the single-process reference."""
