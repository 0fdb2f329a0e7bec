"""``fedtrimmedavg`` aggregator: Flower's ``FedTrimmedAvg`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "fedtrimmedavg")
class FedTrimmedAvg:
    """Coordinate-wise trimmed mean of client models (Flower's FedTrimmedAvg)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        beta: float = 0.2
        """Fraction cut from each tail before averaging, in [0, 0.5)."""

        def __post_init__(self) -> None:
            if not 0.0 <= self.beta < 0.5:
                raise ValueError(f"beta must be in [0, 0.5), got {self.beta}")

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.FedTrimmedAvg(**sampling.kwargs(), **asdict(config))
