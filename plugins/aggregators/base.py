"""What every aggregator plugin provides, ``build_strategy`` by name, and the strategies' server-side state
(``strategy_state`` / ``load_strategy_state``) that a checkpoint carries across a resume."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from fedge.config import from_mapping
from fedge.errors import DataError
from fedge.registry import Kind, Registry

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

__all__ = ["AggregatorPlugin", "Sampling", "build_strategy", "load_strategy_state", "state_kinds", "strategy_state"]

_STATE_ATTRS: dict[str, type] = {"m_t": dict, "v_t": dict, "momentum_vector": list}
"""Server-side optimizer state of Flower 1.39's strategies: FedOpt's (FedAdam, FedYogi, FedAdagrad) first and
second moments, dicts by array name, and FedAvgM's momentum, a list in array order. All else a strategy holds is
its settings, or the current global arrays, which ``configure_train`` takes again from the (checkpointed) model."""


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


class _FlowerStrategy:
    """Base of the built-in aggregators: ``build`` makes Flower's strategy ``flower_class`` from the Config fields.

    A subclass sets ``flower_class`` and a ``Config`` whose fields are that strategy's keyword arguments.
    """

    flower_class: ClassVar[str]
    """Name of the class in ``flwr.serverapp.strategy``, e.g. ``"FedAvg"``."""
    Config: ClassVar[type]

    @classmethod
    def build(cls, config: Any, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy  # flwr loads only when a run builds its strategy

        return getattr(strategy, cls.flower_class)(**sampling.kwargs(), **asdict(config))  # type: ignore[no-any-return]


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
    config: Any = from_mapping(plugin.Config, options or {}, where=f"aggregator.{name}")
    return plugin.build(config, sampling or Sampling())


def _innermost(strategy: Strategy) -> Strategy:
    # Flower's differential-privacy wrappers keep the strategy that aggregates (and holds the state) in .strategy.
    while (inner := getattr(strategy, "strategy", None)) is not None:
        strategy = inner
    return strategy


def state_kinds(strategy: Strategy) -> list[str]:
    """The kinds of server-side state the strategy keeps (``m_t``, ``v_t``, ``momentum_vector``); empty if none."""
    inner = _innermost(strategy)
    return [attr for attr in _STATE_ATTRS if hasattr(inner, attr)]


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's server-side optimizer state as named arrays, for a checkpoint.

    Keys are ``m_t/<array name>``, ``v_t/<array name>`` (FedAdam, FedYogi, FedAdagrad) and
    ``momentum_vector/<index>`` (FedAvgM); empty for a stateless strategy and before its first aggregation.

    Example::

        np.savez(file, **strategy_state(strategy))
    """
    inner = _innermost(strategy)
    state: dict[str, np.ndarray] = {}
    for attr in _STATE_ATTRS:
        value = getattr(inner, attr, None)
        if isinstance(value, Mapping):
            state.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            state.update({f"{attr}/{i}": np.asarray(v) for i, v in enumerate(value)})
    return state


def load_strategy_state(
    strategy: Strategy, state: Mapping[str, np.ndarray], *, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> None:
    """Put a :func:`strategy_state` back into a freshly built strategy of the same aggregator.

    Args:
        strategy: the strategy, as ``build_strategy`` (and a DP wrapper) made it.
        state: the saved arrays.
        shapes: the global model's array shapes by name, in order; when given, every saved array must match.

    Raises:
        DataError: an entry this strategy has no place for, or that does not fit the model.
    """
    inner = _innermost(strategy)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        attr, _, name = key.partition("/")
        if attr not in state_kinds(inner) or not name:
            raise DataError(
                f"saved strategy state {key!r} does not belong to {type(inner).__name__} "
                f"(it keeps {', '.join(state_kinds(inner)) or 'no state'}); was the aggregator changed?"
            )
        grouped.setdefault(attr, {})[name] = np.array(value)
    expected = list((shapes or {}).items())
    for attr, entries in grouped.items():
        if _STATE_ATTRS[attr] is list:
            if sorted(entries) != sorted(str(i) for i in range(len(entries))):
                raise DataError(
                    f"saved strategy state {attr} has entries {sorted(entries)}; expected 0..{len(entries) - 1}"
                )
            named = [(f"{attr}/{i}", entries[str(i)]) for i in range(len(entries))]
            wanted = [(f"{attr}/{i}", shape) for i, (_, shape) in enumerate(expected)]
        else:
            named = [(f"{attr}/{k}", v) for k, v in entries.items()]
            wanted = [(f"{attr}/{k}", shape) for k, shape in expected]
        if shapes is not None:
            got = sorted((k, tuple(v.shape)) for k, v in named)
            if got != sorted(wanted):
                raise DataError(
                    f"saved strategy state {attr} does not fit the model (arrays or shapes differ: "
                    f"{sorted(set(got) ^ set(wanted))[:3]}); delete the strategy state file to restart it from zero"
                )
        setattr(inner, attr, dict(entries) if _STATE_ATTRS[attr] is dict else [v for _, v in named])
