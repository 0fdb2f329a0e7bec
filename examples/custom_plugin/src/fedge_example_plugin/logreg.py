"""Multinomial logistic regression as a fedge ``model`` plugin (install: pip install ./examples/custom_plugin)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from fedge.plugins.models import ModelConfig
from fedge.registry import plugin


@plugin("model", "logreg")
class LogReg:
    """Multinomial logistic regression: flatten, one linear layer."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(ModelConfig):
        bias: bool = True
        """Learn a bias per class."""

    @staticmethod
    def build(config: Config, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes, bias=config.bias))
