"""``fedavgm`` aggregator: Flower's ``FedAvgM`` strategy, wrapped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from fedge.plugins.aggregators.base import StateKind, _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "fedavgm")
class FedAvgM(_FlowerStrategy):
    """FedAvg with server-side momentum (Flower's FedAvgM)."""

    flower_class = "FedAvgM"
    checkpoint_state: ClassVar[Mapping[str, StateKind]] = {"momentum_vector": "in_order"}  # server momentum, one array per model array

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        server_learning_rate: float = 1.0
        """Server learning rate applied to the averaged update."""
        server_momentum: float = 0.0
        """Server momentum (0 is plain FedAvg)."""
