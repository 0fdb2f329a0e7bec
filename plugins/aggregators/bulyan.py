"""``bulyan`` aggregator: Flower's ``Bulyan`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "bulyan")
class Bulyan:
    """Bulyan: Multi-Krum selection then trimmed median; needs n >= 4f + 3 clients (Flower's Bulyan)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        num_malicious_nodes: int = 0
        """Number of Byzantine clients to tolerate (n >= 4f + 3)."""

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.Bulyan(**sampling.kwargs(), **asdict(config))
