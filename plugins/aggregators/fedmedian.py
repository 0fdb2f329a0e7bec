"""``fedmedian`` aggregator: Flower's ``FedMedian`` strategy, wrapped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedge.plugins.aggregators.base import Sampling
from fedge.registry import plugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@plugin("aggregator", "fedmedian")
class FedMedian:
    """Coordinate-wise median of client models; robust to a minority of outliers (Flower's FedMedian)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        """No options."""

    @staticmethod
    def build(config: Config, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return strategy.FedMedian(**sampling.kwargs(), **asdict(config))
