"""``krum`` aggregator: Flower's ``Krum`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "krum")
class Krum:
    """Krum: keeps the client model closest to its neighbours; Byzantine-robust (Flower's Krum)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        num_malicious_nodes: int = 1
        """Number of Byzantine clients to tolerate."""

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.Krum(**sampling.kwargs(), **asdict(config))
