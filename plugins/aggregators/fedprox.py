"""``fedprox`` aggregator: Flower's ``FedProx`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.plugins.aggregators.base import _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "fedprox")
class FedProx(_FlowerStrategy):
    """FedAvg whose clients add a proximal term (mu/2)||w - w_global||^2 (Flower's FedProx)."""

    flower_class = "FedProx"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        proximal_mu: float = 0.01
        """Weight of the proximal term clients add to their loss."""

        def __post_init__(self) -> None:
            if self.proximal_mu < 0:
                raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
