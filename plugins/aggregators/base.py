"""What every aggregator plugin provides, and the server-side state a checkpoint carries across a resume.

An aggregator plugin builds any Flower ``Strategy`` (one of Flower's, or its own subclass) and declares the
attributes of that strategy that are state to checkpoint (``checkpoint_state``); the server loop saves and
restores exactly those, so a new stateful aggregator keeps its state across ``--resume`` without an edit here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

from fedge.errors import ConfigError, DataError, PluginLoadError
from fedge.registry import Kind, Registry

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

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

StateKind = Literal["by_name", "in_order", "value"]
"""How a strategy attribute holds its state: ``by_name`` a dict of arrays keyed like the model's arrays
(FedAdam's ``m_t``), ``in_order`` a list of arrays in the model's order (FedAvgM's ``momentum_vector``),
``value`` one array or number (an adaptive clipping norm)."""
_KINDS = ("by_name", "in_order", "value")


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


@runtime_checkable
class AggregatorPlugin(Protocol):
    """An ``aggregator`` plugin: a nested ``Config``, ``build`` and the state it wants checkpointed.

    A plugin may also define ``min_clients(config) -> int``: the clients a round must sample for the
    strategy to aggregate at all (Bulyan's 4f + 3); a run that would sample fewer is refused before it starts.
    """

    Config: type
    checkpoint_state: ClassVar[Mapping[str, StateKind]]
    """Attributes of the built strategy that are server-side state, and how each holds it; empty if none."""

    @staticmethod
    def build(config: Any, sampling: Sampling) -> Strategy: ...


class _FlowerStrategy:
    """Base of the built-in aggregators: ``build`` makes Flower's strategy ``flower_class`` from the Config fields."""

    flower_class: ClassVar[str]
    """Name of the class in ``flwr.serverapp.strategy``, e.g. ``"FedAvg"`` (imported only when a run builds it)."""
    checkpoint_state: ClassVar[Mapping[str, StateKind]] = {}
    Config: ClassVar[type]

    @classmethod
    def build(cls, config: Any, sampling: Sampling) -> Strategy:
        from flwr.serverapp import strategy

        return getattr(strategy, cls.flower_class)(**sampling.kwargs(), **asdict(config))  # type: ignore[no-any-return]


def aggregator_registry() -> Registry[AggregatorPlugin]:
    """The installed aggregators, each checked against :class:`AggregatorPlugin` when loaded."""
    return Registry(Kind.AGGREGATOR, AggregatorPlugin)


def min_clients_of(plugin: AggregatorPlugin, config: Any) -> int:
    """Clients a round must sample for ``plugin`` to aggregate (1 unless the plugin says more)."""
    rule = getattr(plugin, "min_clients", None)
    return int(rule(config)) if callable(rule) else 1


@dataclass(frozen=True, slots=True)
class Aggregator:
    """A built aggregator: its name, the Flower strategy, and the state that strategy keeps."""

    name: str
    strategy: Strategy
    state: Mapping[str, StateKind]

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The declared state as named arrays, for a checkpoint (see :func:`strategy_state`)."""
        return strategy_state(self.strategy, self.state)

    def load_state(self, arrays: Mapping[str, np.ndarray], *, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        """Put saved state back (see :func:`load_strategy_state`)."""
        load_strategy_state(self.strategy, arrays, self.state, shapes=shapes)


def build_aggregator(
    name: str,
    options: Mapping[str, Any] | None = None,
    sampling: Sampling | None = None,
    *,
    registry: Registry[AggregatorPlugin] | None = None,
) -> Aggregator:
    """Aggregator plugin ``name`` configured with ``options`` (its Config fields), built.

    Raises:
        ConfigError: a bad option (one line naming it).
        PluginLoadError: the plugin built no Flower Strategy, or declares state it cannot describe.

    Example::

        agg = build_aggregator("fedtrimmedavg", {"beta": 0.2})
    """
    from flwr.serverapp.strategy import Strategy

    chosen = (registry or aggregator_registry()).choose(name, options, where=f"aggregator.{name}")
    state = dict(chosen.plugin.checkpoint_state)
    bad = {k: v for k, v in state.items() if v not in _KINDS}
    if bad:
        raise PluginLoadError(f"aggregator {name!r} declares checkpoint_state {bad}; each kind must be one of {_KINDS}")
    strategy = chosen.plugin.build(chosen.config, sampling or Sampling())
    if not isinstance(strategy, Strategy):
        raise PluginLoadError(f"aggregator {name!r} built {type(strategy).__name__}, not a flwr.serverapp.strategy.Strategy")
    return Aggregator(name=name, strategy=strategy, state=state)


def build_strategy(
    name: str,
    options: Mapping[str, Any] | None = None,
    sampling: Sampling | None = None,
    *,
    registry: Registry[AggregatorPlugin] | None = None,
) -> Strategy:
    """The Flower strategy of aggregator plugin ``name`` (see :func:`build_aggregator`)."""
    return build_aggregator(name, options, sampling, registry=registry).strategy


def check_client_count(name: str, options: Mapping[str, Any] | None, num_sampled: int) -> None:
    """Refuse, before a run starts, an aggregator that cannot aggregate ``num_sampled`` updates per round.

    Raises:
        ConfigError: e.g. Bulyan with 5 sampled clients and one Byzantine client (needs 4f + 3 = 7).
    """
    chosen = aggregator_registry().choose(name, options, where=f"aggregator.{name}")
    needed = min_clients_of(chosen.plugin, chosen.config)
    if num_sampled < needed:
        raise ConfigError(
            f"aggregator {name} with {dict(options or {}) or 'its defaults'} needs at least {needed} clients per "
            f"round, but a round samples {num_sampled}; add clients, raise --fraction-train or lower num_malicious_nodes"
        )


def _innermost(strategy: Strategy) -> Strategy:
    # Flower's differential-privacy wrappers keep the strategy that aggregates (and holds the state) in .strategy.
    while (inner := getattr(strategy, "strategy", None)) is not None:
        strategy = inner
    return strategy


def strategy_state(strategy: Strategy, declared: Mapping[str, StateKind]) -> dict[str, np.ndarray]:
    """The strategy's declared server-side state as named arrays, for a checkpoint.

    Keys are ``<attr>/<array name>`` (``by_name``), ``<attr>/<index>`` (``in_order``) and ``<attr>`` (``value``);
    an attribute that is None (no aggregation yet) is left out.

    Example::

        np.savez(file, **strategy_state(strategy, {"m_t": "by_name"}))
    """
    inner = _innermost(strategy)
    state: dict[str, np.ndarray] = {}
    for attr, kind in declared.items():
        value = getattr(inner, attr, None)
        if value is None:
            continue
        if kind == "by_name":
            state.update({f"{attr}/{k}": np.asarray(v) for k, v in dict(value).items()})
        elif kind == "in_order":
            state.update({f"{attr}/{i}": np.asarray(v) for i, v in enumerate(value)})
        else:
            state[attr] = np.asarray(value)
    return state


def load_strategy_state(
    strategy: Strategy,
    state: Mapping[str, np.ndarray],
    declared: Mapping[str, StateKind],
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Put a :func:`strategy_state` back into a freshly built strategy of the same aggregator.

    Args:
        strategy: the strategy, as the aggregator (and a DP wrapper) built it.
        state: the saved arrays.
        declared: the aggregator's ``checkpoint_state``.
        shapes: the global model's array shapes by name, in order; when given, ``by_name`` and ``in_order``
            state must match them.

    Raises:
        DataError: an entry this strategy has no place for, or that does not fit the model.
    """
    inner = _innermost(strategy)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        attr, _, name = key.partition("/")
        if attr not in declared or (declared[attr] == "value") != (not name):
            raise DataError(
                f"saved strategy state {key!r} does not belong to {type(inner).__name__} "
                f"(it keeps {', '.join(declared) or 'no state'}); was the aggregator changed?"
            )
        grouped.setdefault(attr, {})[name] = np.array(value)
    for attr, entries in grouped.items():
        kind = declared[attr]
        if kind == "value":
            value = entries[""]
            setattr(inner, attr, value.item() if value.ndim == 0 else value)
            continue
        named = _ordered(attr, entries) if kind == "in_order" else [(f"{attr}/{k}", v) for k, v in entries.items()]
        if shapes is not None:
            _check_fits(attr, kind, named, shapes)
        setattr(inner, attr, dict(entries) if kind == "by_name" else [v for _, v in named])


def _ordered(attr: str, entries: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    if sorted(entries) != sorted(str(i) for i in range(len(entries))):
        raise DataError(f"saved strategy state {attr} has entries {sorted(entries)}; expected 0..{len(entries) - 1}")
    return [(f"{attr}/{i}", entries[str(i)]) for i in range(len(entries))]


def _check_fits(
    attr: str, kind: StateKind, named: list[tuple[str, np.ndarray]], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    expected = list(shapes.items())
    if kind == "in_order":
        wanted = [(f"{attr}/{i}", shape) for i, (_, shape) in enumerate(expected)]
    else:
        wanted = [(f"{attr}/{k}", shape) for k, shape in expected]
    got = sorted((k, tuple(v.shape)) for k, v in named)
    if got != sorted(wanted):
        raise DataError(
            f"saved strategy state {attr} does not fit the model (arrays or shapes differ: "
            f"{sorted(set(got) ^ set(wanted))[:3]}); delete the strategy state file to restart it from zero"
        )
