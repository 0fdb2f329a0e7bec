"""What every aggregator plugin provides, and ``build_strategy`` by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedge.config import from_mapping
from fedge.registry import Kind, Registry

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

__all__ = ["AggregatorPlugin", "Sampling", "build_strategy"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Sampling:
    """Client sampling that fedge's server loop controls, passed to every Flower strategy."""

    fraction_train: float = 1.0
    """Share of connected clients sampled per round."""
    min_train_nodes: int = 1
    """At least this many sampled per round (when connected)."""

    def kwargs(self) -> dict[str, Any]:
        # fedge waits for clients itself, with a deadline; Flower's own wait (min_available_nodes) has none,
        # so it is kept at the sample size, which the server loop has already seen connected.
        return {
            "fraction_train": self.fraction_train,
            "min_train_nodes": self.min_train_nodes,
            "min_available_nodes": self.min_train_nodes,
        }


class AggregatorPlugin(Protocol):
    """An ``aggregator`` plugin: a nested ``Config`` and ``build``."""

    Config: type

    @staticmethod
    def build(config: Any, sampling: Sampling) -> Strategy: ...


def build_strategy(
    name: str,
    options: Mapping[str, Any] | None = None,
    sampling: Sampling | None = None,
    *,
    registry: Registry[AggregatorPlugin] | None = None,
) -> Strategy:
    """The Flower strategy of aggregator plugin ``name`` configured with ``options`` (its Config fields).

    Example::

        strategy = build_strategy("fedtrimmedavg", {"beta": 0.2})
    """
    registry = registry or Registry(Kind.AGGREGATOR)
    plugin = registry.get(name)
    config = from_mapping(plugin.Config, options or {}, where=f"aggregator.{name}")
    return plugin.build(config, sampling or Sampling())
