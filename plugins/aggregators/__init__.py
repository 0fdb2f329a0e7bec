"""Aggregator plugins: Flower's own server strategies (``flwr.serverapp.strategy``) wrapped, never rewritten.

Each module registers one ``@plugin("aggregator", name)`` class with a ``Config``, ``checkpoint_state`` and
``build(config, sampling) -> flwr Strategy``; ``fedge fl run --aggregator NAME`` picks one.
"""

from fedge.plugins.aggregators.base import (
    Aggregator,
    AggregatorPlugin,
    Sampling,
    StateKind,
    aggregator_registry,
    build_aggregator,
    build_strategy,
    check_client_count,
    load_strategy_state,
    strategy_state,
)

__all__ = [
    "Aggregator",
    "AggregatorPlugin",
    "Sampling",
    "StateKind",
    "aggregator_registry",
    "build_aggregator",
    "build_strategy",
    "check_client_count",
    "load_strategy_state",
    "strategy_state",
]
