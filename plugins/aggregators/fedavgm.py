"""``fedavgm`` aggregator: Flower's ``FedAvgM`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "fedavgm")
class FedAvgM:
    """FedAvg with server-side momentum (Flower's FedAvgM)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        server_learning_rate: float = 1.0
        """Server learning rate applied to the averaged update."""
        server_momentum: float = 0.0
        """Server momentum (0 is plain FedAvg)."""

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.FedAvgM(**sampling.kwargs(), **asdict(config))
