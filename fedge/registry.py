"""Plugin registry: a decorator that tags, entry points that advertise, a Registry that loads lazily.

fedge's own built-ins are found exactly like a third-party package's: through the entry-point groups
below, declared in a ``pyproject.toml``. Example::

    from fedge.registry import Kind, Registry

    models = Registry(Kind.MODEL)
    models.names()          # reads metadata only
    cnn = models.get("cnn")  # imports one plugin
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, is_dataclass
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar, cast, overload

from fedge.errors import DuplicatePluginError, PluginLoadError, PluginNotFoundError

__all__ = [
    "Chosen",
    "EntryPointSource",
    "Kind",
    "PluginInfo",
    "PluginSpec",
    "Registry",
    "plugin",
    "plugin_info",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
_ATTR = "__fedge_plugin__"
# Top-level modules of the heavy frameworks, and the extra that installs each.
_EXTRA_FOR_MODULE = {
    "torch": "torch",
    "sklearn": "torch",
    "flwr": "flower",
    "tensorflow": "edge",
    "keras": "edge",
    "ai_edge_litert": "edge",
    "tflite_micro": "edge",
    "litert_torch": "edge",
    "tflite": "edge",
    "orjson": "profiler",
}


class Kind(StrEnum):
    """The kinds of plugin, each with its own entry-point group."""

    STRATEGY = "strategy"
    AGGREGATOR = "aggregator"
    ANALYSIS = "analysis"
    EXPORTER = "exporter"
    DATASET = "dataset"
    MODEL = "model"

    @property
    def group(self) -> str:
        """The entry-point group, e.g. ``fedge.strategies``."""
        return _GROUPS[self]


_GROUPS = {
    Kind.STRATEGY: "fedge.strategies",
    Kind.AGGREGATOR: "fedge.aggregators",
    Kind.ANALYSIS: "fedge.analyses",
    Kind.EXPORTER: "fedge.exporters",
    Kind.DATASET: "fedge.datasets",
    Kind.MODEL: "fedge.models",
}


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What the ``plugin`` decorator attaches to a class or function."""

    kind: Kind
    name: str


def plugin(kind: Kind | str, name: str) -> Callable[[T], T]:
    """Tag ``obj`` as a fedge plugin of ``kind`` named ``name``; returns it unchanged.

    Args:
        kind: one of :class:`Kind` (or its string value).
        name: lowercase identifier, also the entry-point and config name (``fedavg``, ``tiny-gpt``).

    Raises:
        ValueError: the kind or the name is invalid.

    Example::

        @plugin("model", "mlp")
        class MLP: ...
    """
    kind = Kind(kind)
    if not _NAME_RE.match(name):
        raise ValueError(f"plugin name must be a lowercase identifier like 'ring-allreduce', got {name!r}")
    info = PluginInfo(kind=kind, name=name)

    def tag(obj: T) -> T:
        setattr(obj, _ATTR, info)
        return obj

    return tag


def plugin_info(obj: object) -> PluginInfo | None:
    """The tag ``plugin`` put on ``obj``, or None."""
    info = getattr(obj, _ATTR, None)
    return info if isinstance(info, PluginInfo) else None


class _EntryPoint(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> str: ...
    def load(self) -> Any: ...


class EntryPointSource(Protocol):
    """Where entry points come from: ``(group) -> [(entry point, distribution, version)]``."""

    def __call__(self, group: str) -> Iterable[tuple[_EntryPoint, str, str]]: ...


def _installed_entry_points(group: str) -> list[tuple[_EntryPoint, str, str]]:
    found: list[tuple[_EntryPoint, str, str]] = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = ep.dist
        found.append((ep, dist.name if dist else "unknown", dist.version if dist else "unknown"))
    return found


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """An advertised plugin, known from metadata only (nothing imported)."""

    name: str
    kind: Kind
    distribution: str
    version: str
    value: str


@dataclass(frozen=True, slots=True)
class Chosen(Generic[T]):
    """A plugin reference resolved once: the name, the plugin, and its validated ``Config``."""

    name: str
    plugin: T
    config: Any


class Registry(Generic[T]):
    """The plugins of one kind, found through entry points and imported on first use.

    Built-ins and third-party plugins take the same path: found by entry point, checked against the kind's
    protocol when imported, and configured through their own ``Config`` dataclass.

    Args:
        kind: which plugins this registry holds.
        protocol: the kind's ``@runtime_checkable`` Protocol; ``get`` refuses a plugin that does not satisfy
            it, and the registry is typed by it (``Registry(Kind.MODEL, ModelPlugin)`` is a
            ``Registry[ModelPlugin]``). Without it plugins are only checked for their tag and ``Config``.
        source: entry-point source; the installed distributions by default (tests inject fakes).
        env: environment to read ``FEDGE_DISABLE_PLUGIN_AUTOLOAD`` and ``FEDGE_PLUGINS`` from
            (``os.environ`` when None). With autoload disabled only the ``fedge`` distribution's
            plugins, and the names or distributions listed in ``FEDGE_PLUGINS``, are visible.

    Raises:
        DuplicatePluginError: two distributions register the same name.
    """

    @overload
    def __init__(
        self: Registry[T],
        kind: Kind | str,
        protocol: type[T],
        *,
        source: EntryPointSource | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self: Registry[Any],
        kind: Kind | str,
        protocol: None = None,
        *,
        source: EntryPointSource | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None: ...

    def __init__(
        self,
        kind: Kind | str,
        protocol: type[T] | None = None,
        *,
        source: EntryPointSource | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.kind = Kind(kind)
        self.protocol = protocol
        env = os.environ if env is None else env
        autoload = env.get("FEDGE_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        allowed = {s.strip() for s in env.get("FEDGE_PLUGINS", "").split(",") if s.strip()}
        self._entries: dict[str, tuple[_EntryPoint, PluginSpec]] = {}
        self._loaded: dict[str, T] = {}
        for ep, dist, version in (source or _installed_entry_points)(self.kind.group):
            if not autoload and dist != "fedge" and ep.name not in allowed and dist not in allowed:
                continue
            spec = PluginSpec(name=ep.name, kind=self.kind, distribution=dist, version=version, value=ep.value)
            seen = self._entries.get(ep.name)
            if seen is not None:
                if seen[1].distribution == dist:
                    continue  # the same distribution seen twice on sys.path
                raise DuplicatePluginError(
                    f"{self.kind} plugin {ep.name!r} is registered by both {seen[1].distribution} "
                    f"({seen[1].value}) and {dist} ({ep.value}); uninstall one of them"
                )
            self._entries[ep.name] = (ep, spec)

    def names(self) -> list[str]:
        """Sorted names of the advertised plugins; imports nothing."""
        return sorted(self._entries)

    def specs(self) -> list[PluginSpec]:
        """Metadata of every advertised plugin, sorted by name; imports nothing."""
        return [self._entries[n][1] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        """Import and return the plugin called ``name``.

        Raises:
            PluginNotFoundError: no such name; the message lists the valid ones.
            PluginLoadError: the plugin failed to import, or is not tagged with ``@plugin``.
        """
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._entries:
            valid = ", ".join(self.names()) or "none installed"
            raise PluginNotFoundError(f"unknown {self.kind} {name!r}; valid: {valid}")
        ep, spec = self._entries[name]
        try:
            obj = ep.load()
        except ModuleNotFoundError as err:
            top = (err.name or "").split(".")[0]
            extra = _EXTRA_FOR_MODULE.get(top)
            hint = f"; install it with: pip install 'fedge[{extra}]'" if extra else ""
            raise PluginLoadError(
                f"{self.kind} {name!r} ({spec.distribution}) needs the module {err.name!r}, which is not installed{hint}"
            ) from err
        except Exception as err:
            raise PluginLoadError(
                f"{self.kind} {name!r} from {spec.distribution} failed to import ({spec.value}): "
                f"{type(err).__name__}: {err}"
            ) from err
        info = plugin_info(obj)
        if info is None or info.kind is not self.kind or info.name != name:
            raise PluginLoadError(
                f"entry point {name!r} in {self.kind.group} ({spec.distribution}: {spec.value}) must point at an "
                f"object decorated with @plugin({self.kind.value!r}, {name!r}); found {info}"
            )
        self._check_shape(name, spec, obj)
        self._loaded[name] = cast(T, obj)
        return self._loaded[name]

    def _check_shape(self, name: str, spec: PluginSpec, obj: object) -> None:
        where = f"{self.kind} {name!r} ({spec.distribution}: {spec.value})"
        config = getattr(obj, "Config", None)
        if not (isinstance(config, type) and is_dataclass(config)):
            raise PluginLoadError(f"{where} must nest a dataclass named Config holding its settings; found {config!r}")
        if self.protocol is not None and not isinstance(obj, self.protocol):
            wanted = [m for m in _protocol_members(self.protocol) if not hasattr(obj, m)]
            missing = f"; it lacks {', '.join(wanted)}" if wanted else ""
            raise PluginLoadError(f"{where} does not implement the {self.protocol.__name__} protocol{missing}")

    def choose(self, name: str, options: Mapping[str, Any] | None = None, *, where: str | None = None) -> Chosen[T]:
        """Resolve a plugin reference from a config into the plugin and its validated ``Config``.

        Args:
            name: the plugin's name.
            options: its settings (a TOML table or ``-o key=value`` pairs); strings are coerced.
            where: how the settings are named in messages; ``<kind>.<name>`` by default.

        Raises:
            PluginNotFoundError, PluginLoadError: as for :meth:`get`.
            ConfigError: an unknown or invalid setting (one line naming it and the valid ones).

        Example::

            chosen = Registry(Kind.STRATEGY, StrategyPlugin).choose("ring-allreduce", {"chunk_bytes": "65536"})
            chosen.plugin(chosen.config)
        """
        from fedge.config import from_mapping

        plugin = self.get(name)
        config = from_mapping(getattr(plugin, "Config"), dict(options or {}), where=where or f"{self.kind}.{name}")  # noqa: B009 - T is any protocol
        return Chosen(name=name, plugin=plugin, config=config)

    def load_all(self) -> dict[str, T]:
        """Import every plugin; one that fails becomes a warning naming it and the cause."""
        loaded: dict[str, T] = {}
        for name in self.names():
            try:
                loaded[name] = self.get(name)
            except PluginLoadError as err:
                warnings.warn(str(err), RuntimeWarning, stacklevel=2)
                logger.debug("plugin %s failed to load", name, exc_info=True)
        return loaded


def _protocol_members(protocol: type) -> list[str]:
    # The public names a Protocol asks for (typing keeps its own list private before Python 3.12).
    names: set[str] = set()
    for base in protocol.__mro__:
        if base in (Protocol, Generic, object):
            continue
        names.update(n for n in (*vars(base), *getattr(base, "__annotations__", {})) if not n.startswith("_"))
    return sorted(names)


def summary_of(obj: object) -> str:
    """First line of the object's docstring."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""
