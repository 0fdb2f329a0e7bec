"""``fedavg`` aggregator: Flower's ``FedAvg`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "fedavg")
class FedAvg:
    """Federated averaging of client models, weighted by sample count (Flower's FedAvg)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        """No options."""

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.FedAvg(**sampling.kwargs(), **asdict(config))
