"""``fedyogi`` aggregator: Flower's ``FedYogi`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.plugins.aggregators.fedadam import FedAdam
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "fedyogi")
class FedYogi:
    """Adaptive server optimisation with Yogi on the averaged update (Flower's FedYogi)."""

    Config = FedAdam.Config  # Yogi takes exactly Adam's settings

    @staticmethod
    def build(config: FedAdam.Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.FedYogi(**sampling.kwargs(), **asdict(config))
