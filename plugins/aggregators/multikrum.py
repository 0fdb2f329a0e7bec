"""``multikrum`` aggregator: Flower's ``MultiKrum`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "multikrum")
class MultiKrum:
    """Multi-Krum: averages the models Krum scores best; Byzantine-robust (Flower's MultiKrum)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        num_malicious_nodes: int = 1
        """Number of Byzantine clients to tolerate."""
        num_nodes_to_select: int = 2
        """How many best-scored models are averaged."""

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.MultiKrum(**sampling.kwargs(), **asdict(config))
