"""Small convolutional network sized for 8x8 digits and small images; TFLite- and TFLM-friendly ops only."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedge.plugins.models.base import ModelConfig
from fedge.registry import plugin


@plugin("model", "cnn")
class CNN:
    """Small CNN: 3x3 conv + ReLU + 2x2 max-pool blocks, then a hidden dense layer and a classifier."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(ModelConfig):
        channels: tuple[int, ...] = (32, 64)
        """Output channels of each conv block; each block halves height and width."""
        hidden: int = 128
        """Width of the dense layer before the classifier."""

        def __post_init__(self) -> None:
            if not self.channels or any(c < 1 for c in self.channels):
                raise ValueError(f"channels must be a non-empty list of positive ints, got {self.channels}")
            if self.hidden < 1:
                raise ValueError(f"hidden must be >= 1, got {self.hidden}")

    @staticmethod
    def build(config: Config, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image inputs (channels, height, width); got sample shape {input_shape}")
        c, h, w = input_shape
        if min(h, w) < 2 ** len(config.channels):
            raise ValueError(
                f"{h}x{w} images are too small for {len(config.channels)} pooling blocks; use fewer channels entries"
            )
        layers: list[nn.Module] = []
        for out in config.channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, config.hidden), nn.ReLU(), nn.Linear(config.hidden, num_classes)]
        return nn.Sequential(*layers)
