"""``fedyogi`` aggregator: Flower's ``FedYogi`` strategy, wrapped."""

from __future__ import annotations

from fedge.plugins.aggregators.base import _FlowerStrategy
from fedge.plugins.aggregators.fedadam import FedAdam
from fedge.registry import plugin


@plugin("aggregator", "fedyogi")
class FedYogi(_FlowerStrategy):
    """Adaptive server optimisation with Yogi on the averaged update (Flower's FedYogi)."""

    flower_class = "FedYogi"

    Config = FedAdam.Config  # Yogi takes exactly Adam's settings
