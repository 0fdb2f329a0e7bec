"""``fedadagrad`` aggregator: Flower's ``FedAdagrad`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "fedadagrad")
class FedAdagrad:
    """Adaptive server optimisation with Adagrad on the averaged update (Flower's FedAdagrad)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        eta: float = 0.1
        """Server learning rate."""
        eta_l: float = 0.05
        """Client learning rate (informational in Flower)."""
        tau: float = 1e-3
        """Adaptivity (numerical stability) term."""

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.FedAdagrad(**sampling.kwargs(), **asdict(config))
