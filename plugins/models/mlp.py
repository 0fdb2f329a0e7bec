"""Multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from fedge.plugins.models.base import ModelConfig
from fedge.registry import plugin


@plugin("model", "mlp")
class MLP:
    """Multi-layer perceptron: flatten, hidden ReLU layers, linear classifier."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(ModelConfig):
        hidden: tuple[int, ...] = (128, 64)
        """Width of each hidden layer."""

        def __post_init__(self) -> None:
            if any(h < 1 for h in self.hidden):
                raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")

    @staticmethod
    def build(config: Config, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
