"""``multikrum`` aggregator: Flower's ``MultiKrum`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.plugins.aggregators.base import _FlowerStrategy
from fedge.registry import plugin


@plugin("aggregator", "multikrum")
class MultiKrum(_FlowerStrategy):
    """Multi-Krum: averages the models Krum scores best; Byzantine-robust (Flower's MultiKrum)."""

    flower_class = "MultiKrum"

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        num_malicious_nodes: int = 1
        """Number of Byzantine clients to tolerate."""
        num_nodes_to_select: int = 2
        """How many best-scored models are averaged."""

        def __post_init__(self) -> None:
            if self.num_malicious_nodes < 0 or self.num_nodes_to_select < 1:
                raise ValueError(
                    "num_malicious_nodes must be >= 0 and num_nodes_to_select >= 1, "
                    f"got {self.num_malicious_nodes} and {self.num_nodes_to_select}"
                )

    @staticmethod
    def min_clients(config: Config) -> int:
        # Krum's guarantee needs n > 2f + 2 updates, and there must be num_nodes_to_select to pick.
        return max(2 * config.num_malicious_nodes + 3, config.num_nodes_to_select)
