"""``fedtrimmedavg`` aggregator: Flower's ``FedTrimmedAvg`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.plugins.aggregators.base import _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "fedtrimmedavg")
class FedTrimmedAvg(_FlowerStrategy):
    """Coordinate-wise trimmed mean of client models (Flower's FedTrimmedAvg)."""

    flower_class = "FedTrimmedAvg"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        beta: float = 0.2
        """Fraction cut from each tail before averaging, in [0, 0.5)."""

        def __post_init__(self) -> None:
            if not 0.0 <= self.beta < 0.5:
                raise ValueError(f"beta must be in [0, 0.5), got {self.beta}")
