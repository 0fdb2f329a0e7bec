"""Cluster training through torchrun: the worker loop, checkpoints, and the launcher."""
