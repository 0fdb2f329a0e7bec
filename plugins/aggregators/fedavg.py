"""``fedavg`` aggregator: Flower's ``FedAvg`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.plugins.aggregators.base import _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "fedavg")
class FedAvg(_FlowerStrategy):
    """Federated averaging of client models, weighted by sample count (Flower's FedAvg)."""

    flower_class = "FedAvg"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        """No options."""
