"""Aggregator plugins: Flower's own server strategies (``flwr.serverapp.strategy``) wrapped, never rewritten.

Each module registers one ``@plugin("aggregator", name)`` class with a ``Config`` and
``build(config, sampling) -> flwr Strategy``; ``fedge fl run --aggregator NAME`` picks one.
"""

from fedge.plugins.aggregators.base import (
    AggregatorPlugin,
    Sampling,
    build_strategy,
    load_strategy_state,
    state_kinds,
    strategy_state,
)

__all__ = ["AggregatorPlugin", "Sampling", "build_strategy", "load_strategy_state", "state_kinds", "strategy_state"]
