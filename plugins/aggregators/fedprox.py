"""``fedprox`` aggregator: Flower's ``FedProx`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "fedprox")
class FedProx:
    """FedAvg whose clients add a proximal term (mu/2)||w - w_global||^2 (Flower's FedProx)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        proximal_mu: float = 0.01
        """Weight of the proximal term clients add to their loss."""

        def __post_init__(self) -> None:
            if self.proximal_mu < 0:
                raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.FedProx(**sampling.kwargs(), **asdict(config))
