"""Torch models as plugins, and saving/rebuilding them with their plugin name and config."""

from fedge.plugins.models.base import ModelConfig, build_model, load_model, model_spec, save_model

__all__ = ["ModelConfig", "build_model", "load_model", "model_spec", "save_model"]
