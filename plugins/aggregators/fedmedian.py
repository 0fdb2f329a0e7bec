"""``fedmedian`` aggregator: Flower's ``FedMedian`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.plugins.aggregators.base import _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "fedmedian")
class FedMedian(_FlowerStrategy):
    """Coordinate-wise median of client models; robust to a minority of outliers (Flower's FedMedian)."""

    flower_class = "FedMedian"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        """No options."""
