"""``bulyan`` aggregator: Flower's ``Bulyan`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.plugins.aggregators.base import _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "bulyan")
class Bulyan(_FlowerStrategy):
    """Bulyan: Multi-Krum selection then trimmed median; needs n >= 4f + 3 clients (Flower's Bulyan)."""

    flower_class = "Bulyan"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        num_malicious_nodes: int = 0
        """Number of Byzantine clients to tolerate (n >= 4f + 3)."""

        def __post_init__(self) -> None:
            if self.num_malicious_nodes < 0:
                raise ValueError(f"num_malicious_nodes must be >= 0, got {self.num_malicious_nodes}")

    @staticmethod
    def min_clients(config: Config) -> int:
        # Flower's Bulyan returns no aggregate with fewer than 4f + 3 updates.
        return 4 * config.num_malicious_nodes + 3
