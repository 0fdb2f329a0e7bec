"""``fedadam`` aggregator: Flower's ``FedAdam`` strategy, wrapped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from fedge.plugins.aggregators.base import StateKind, _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "fedadam")
class FedAdam(_FlowerStrategy):
    """Adaptive server optimisation with Adam on the averaged update (Flower's FedAdam)."""

    flower_class = "FedAdam"

    checkpoint_state: ClassVar[Mapping[str, StateKind]] = {"m_t": "by_name", "v_t": "by_name"}  # FedOpt's first and second moments

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        eta: float = 0.01
        """Server learning rate."""
        eta_l: float = 0.05
        """Client learning rate (informational in Flower)."""
        beta_1: float = 0.9
        """First-moment decay."""
        beta_2: float = 0.99
        """Second-moment decay."""
        tau: float = 1e-3
        """Adaptivity (numerical stability) term."""
