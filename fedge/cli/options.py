"""Command-line options made from a Config dataclass, so each setting is typed and documented once.

A command decorated with :func:`config_options` gets one ``--flag`` per field of the Config, typed from the
field and helped by the docstring written under it; the command receives the flags the user gave as one
``settings`` dict, ready to lay over a TOML file and build the Config with ``from_mapping``. Example::

    @app.command("run")
    @config_options(FlConfig, exclude=("dataset_options",))
    def run(config: Path | None = None, *, settings: dict[str, Any]) -> None:
        cfg = from_mapping(FlConfig, merge(load_toml(config), settings))
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from fedge.config import FieldDoc, describe

__all__ = ["config_options", "option_type"]

F = TypeVar("F", bound=Callable[..., Any])


def option_type(tp: Any) -> type:
    """The type a Typer option parses for a Config field of type ``tp`` (choices and lists arrive as text)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return option_type(args[0])
    if tp in (bool, int, float):
        return typing.cast(type, tp)
    if tp is Path:
        return Path
    if typing.get_origin(tp) is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return str
    return str


def config_options(
    cls: type,
    *,
    fields: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    short: Mapping[str, str] | None = None,
    panel: str | None = None,
) -> Callable[[F], F]:
    """Add one Typer option per field of the Config dataclass ``cls`` to the decorated command.

    Args:
        cls: the Config dataclass.
        fields: only these fields (default: every init field).
        exclude: fields that get no flag (tables, or settings the command takes another way).
        short: extra short flags, e.g. ``{"rounds": "-r"}``.
        panel: the ``--help`` panel the options are listed under.

    The command must take a keyword parameter ``settings``: it receives ``{field: value}`` for each flag the
    user gave (flags not given are left out, so a TOML file's values stand).
    """
    docs = {d.name: d for d in describe(cls)}
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    names = [n for n in (fields if fields is not None else docs) if n not in skip]
    unknown = [n for n in names if n not in docs]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}")
    short = dict(short or {})

    def decorate(func: F) -> F:
        base = inspect.signature(func, eval_str=True)
        kept = [p for p in base.parameters.values() if p.name != "settings"]
        taken = {p.name for p in kept}
        clash = taken.intersection(names)
        if clash:
            raise TypeError(f"{func.__name__} already has a parameter {min(clash)!r}")
        added = [_option(name, docs[name], hints[name], short.get(name), panel) for name in names]

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            settings = {n: kwargs.pop(n) for n in names if n in kwargs}
            return func(*args, settings={k: v for k, v in settings.items() if v is not None}, **kwargs)

        params = sorted([*kept, *added], key=lambda p: p.kind)
        command.__signature__ = base.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # inspect would otherwise show the undecorated signature
        return typing.cast(F, command)

    return decorate


def _option(name: str, doc: FieldDoc, hint: Any, short: str | None, panel: str | None) -> inspect.Parameter:
    """The keyword parameter that gives field ``name`` its ``--flag``, typed and helped from the field."""
    tp = option_type(hint)
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if tp is bool else [flag]
    if short:
        decls.append(short)
    text = doc.doc.replace("``", "") or name.replace("_", " ")
    if " | " in doc.type:
        text += f" One of: {doc.type}."
    if doc.default:
        text += f" (default: {doc.default})"  # not [..]: rich reads brackets as markup
    option = typer.Option(*decls, help=text, show_default=False, rich_help_panel=panel)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[tp | None, option])
