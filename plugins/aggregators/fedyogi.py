"""``fedyogi`` aggregator: Flower's ``FedYogi`` strategy, wrapped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from fedge.plugins.aggregators.base import StateKind, _FlowerStrategy
from fedge.plugins.aggregators.fedadam import FedAdam
from fedge.registry import plugin


@plugin("aggregator", "fedyogi")
class FedYogi(_FlowerStrategy):
    """Adaptive server optimisation with Yogi on the averaged update (Flower's FedYogi)."""

    flower_class = "FedYogi"

    checkpoint_state: ClassVar[Mapping[str, StateKind]] = {"m_t": "by_name", "v_t": "by_name"}  # FedOpt's first and second moments

    Config = FedAdam.Config  # Yogi takes exactly Adam's settings
