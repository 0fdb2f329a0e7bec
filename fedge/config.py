"""Typed configuration: TOML files and CLI flags become frozen dataclasses, validated once, here.

Every command reads an optional TOML file, lays the flags the user gave over it, and builds its
typed config with :func:`from_mapping`; :func:`dump_toml` writes the resolved result into the run
directory. Example::

    raw = merge(load_toml("fl.toml"), {"rounds": 3})
    cfg = from_mapping(FlConfig, raw)
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import enum
import inspect
import itertools
import math
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from fedge.errors import ConfigError

__all__ = [
    "FieldDoc",
    "PartitionConfig",
    "describe",
    "dump_toml",
    "from_mapping",
    "load_toml",
    "merge",
    "parse_partition",
    "to_mapping",
]

C = TypeVar("C")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file.

    Raises:
        ConfigError: the file is missing, unreadable or not valid TOML.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass an existing .toml file or leave it out")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from err


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, recursively; None in ``overrides`` means "not given"."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` as a ``tp``, or one ConfigError naming ``where``, what was expected and what was found."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _coerce_union(typing.get_args(tp), value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if origin in (tuple, list):
        return _coerce_sequence(origin, typing.get_args(tp), value, where)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table; got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table of settings; got {value!r}")
        return from_mapping(tp, value, where=where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where} must be one of {', '.join(str(m.value) for m in tp)}; got {value!r}") from None
    scalar = _SCALARS.get(tp)
    return value if scalar is None else scalar(value, where)


def _coerce_union(args: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(arg, value, where)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")


def _coerce_sequence(origin: type, args: tuple[Any, ...], value: Any, where: str) -> Any:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list; got {value!r}")
    item = args[0] if args else Any
    items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where} must be true or false; got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    raise ConfigError(f"{where} must be an integer; got {value!r}")


def _to_float(value: Any, where: str) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise ConfigError(f"{where} must be a number; got {value!r}")
    if not math.isfinite(number):
        # NaN passes every `x <= 0` check after it, so it is refused here, once, for every setting.
        raise ConfigError(f"{where} must be a finite number; got {value!r}")
    return number


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be a string; got {value!r}")


def _to_path(value: Any, where: str) -> Path:
    if isinstance(value, (str, Path)):
        return Path(value)
    raise ConfigError(f"{where} must be a path; got {value!r}")


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {
    bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, Path: _to_path,
}  # fmt: skip


def from_mapping(cls: type[C], data: Mapping[str, Any], *, where: str = "config") -> C:
    """Build the frozen dataclass ``cls`` from a mapping (TOML table, flags), coercing strings.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones), a value of the wrong type,
            or a value the dataclass's ``__post_init__`` rejects.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting {where}.{unknown[0]}; valid settings: {', '.join(sorted(fields)) or 'none'}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]} is required; set it in the config file or with its flag")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from err


@dataclasses.dataclass(frozen=True, slots=True)
class FieldDoc:
    """One setting of a Config dataclass, as ``describe`` reports it."""

    name: str
    type: str
    default: str
    """The default as TOML-ish text, or "" when the setting is required."""
    doc: str


def _field_docs(cls: type) -> dict[str, str]:
    # The docstring written directly under each field, in this class and the dataclasses it extends.
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(str(m.value) for m in tp)
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def describe(cls: type) -> list[FieldDoc]:
    """The settings of the Config dataclass ``cls``: name, type, default and the docstring under each field.

    Listings and ``--help`` use this, so a setting's documentation is written once, in the Config.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = to_mapping(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = to_mapping(f.default_factory())
        else:
            default = dataclasses.MISSING
        text = "" if default is dataclasses.MISSING else ("none" if default is None else _default_text(default))
        out.append(FieldDoc(name=f.name, type=_type_name(hints[f.name]), default=text, doc=docs.get(f.name, "")))
    return out


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_default_text(v) for v in value)
    return str(value)


def to_mapping(obj: Any) -> Any:
    """A config as plain TOML-ready data: enums become values, tuples lists, None is left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_mapping(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, Mapping):
        return {str(k): to_mapping(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML text for a mapping of plain data (see :func:`to_mapping`)."""
    import tomli_w

    return tomli_w.dumps(to_mapping(data))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PartitionConfig:
    """How a dataset is split across clients or workers."""

    scheme: Literal["iid", "dirichlet", "shards"] = "iid"
    """``iid``: shuffled equal parts; ``dirichlet``: label skew drawn from Dir(alpha); ``shards``: k labels each."""
    alpha: float = 0.5
    """Dirichlet concentration; smaller is more skewed (``dirichlet`` only)."""
    shards_per_client: int = 2
    """Label shards each client receives (``shards`` only)."""
    seed: int = 0
    """Seed of the split; the same seed gives the same partitions."""

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"partition alpha must be > 0, got {self.alpha}")
        if self.shards_per_client < 1:
            raise ValueError(f"partition shards_per_client must be >= 1, got {self.shards_per_client}")

    def __str__(self) -> str:
        if self.scheme == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.scheme == "shards":
            return f"shards:{self.shards_per_client}"
        return "iid"


def parse_partition(spec: str, *, seed: int = 0) -> PartitionConfig:
    """Parse ``iid``, ``dirichlet:ALPHA`` or ``shards:K``.

    Raises:
        ConfigError: anything else.
    """
    scheme, _, arg = spec.strip().partition(":")
    try:
        if scheme == "iid" and not arg:
            return PartitionConfig(scheme="iid", seed=seed)
        if scheme == "dirichlet":
            return PartitionConfig(scheme="dirichlet", alpha=float(arg) if arg else 0.5, seed=seed)
        if scheme == "shards":
            return PartitionConfig(scheme="shards", shards_per_client=int(arg) if arg else 2, seed=seed)
    except ValueError as err:
        raise ConfigError(f"bad partition {spec!r}: {err}; use iid, dirichlet:ALPHA or shards:K") from err
    raise ConfigError(f"bad partition {spec!r}; use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or shards:K")
