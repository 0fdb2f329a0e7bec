"""``krum`` aggregator: Flower's ``Krum`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.plugins.aggregators.base import _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "krum")
class Krum(_FlowerStrategy):
    """Krum: keeps the client model closest to its neighbours; Byzantine-robust (Flower's Krum)."""

    flower_class = "Krum"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        num_malicious_nodes: int = 1
        """Number of Byzantine clients to tolerate."""

        def __post_init__(self) -> None:
            if self.num_malicious_nodes < 0:
                raise ValueError(f"num_malicious_nodes must be >= 0, got {self.num_malicious_nodes}")

    @staticmethod
    def min_clients(config: Config) -> int:
        # Krum's guarantee needs n > 2f + 2 updates per round.
        return 2 * config.num_malicious_nodes + 3
