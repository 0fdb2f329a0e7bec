"""``fedge plugins``: what is installed, by kind, with distribution, version and summary; ``--name`` shows one
plugin's settings (``-o key=value`` / its TOML table) from the docs written in its ``Config``."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Annotated, Any

import typer

from fedge.config import describe
from fedge.errors import ConfigError, PluginNotFoundError
from fedge.registry import Kind, Registry, summary_of


def command(
    kind: Annotated[
        str | None, typer.Option("--kind", "-k", help=f"Only this kind: {', '.join(k.value for k in Kind)}.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Show this plugin's settings, with their types, defaults and docs.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {name, kind, distribution, version, summary}.")] = False,
) -> int:
    """List installed plugins: strategies, aggregators, analyses, exporters, datasets, models."""
    if kind is not None and kind not in {k.value for k in Kind}:
        raise ConfigError(f"unknown plugin kind {kind!r}; valid: {', '.join(k.value for k in Kind)}")
    kinds = [Kind(kind)] if kind else list(Kind)
    if name is not None:
        return _show_one(name, kinds, as_json=as_json)
    rows, failed = [], 0
    for k in kinds:
        registry: Registry[object] = Registry(k)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = registry.load_all()
        for w in caught:
            typer.echo(f"fedge: warning: {w.message}", err=True)
        failed += len(caught)
        for spec in registry.specs():
            rows.append(
                {
                    "name": spec.name,
                    "kind": spec.kind.value,
                    "distribution": spec.distribution,
                    "version": spec.version,
                    "summary": summary_of(loaded[spec.name]) if spec.name in loaded else "(failed to load)",
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("name", "kind", "distribution", "version", "summary", box=None)
        for r in rows:
            table.add_row(r["name"], r["kind"], r["distribution"], r["version"], r["summary"])
        Console().print(table)
    return 2 if failed else 0


def _show_one(name: str, kinds: list[Kind], *, as_json: bool) -> int:
    found = [(k, r) for k in kinds if name in (r := Registry(k))]
    if not found:
        where = kinds[0].value if len(kinds) == 1 else "plugin"
        known = sorted({n for k in kinds for n in Registry(k).names()})
        raise PluginNotFoundError(f"no {where} named {name!r}; installed: {', '.join(known) or 'none'}")
    rows: list[dict[str, Any]] = []
    for k, registry in found:
        obj = registry.get(name)
        spec = next(s for s in registry.specs() if s.name == name)
        options = [dataclasses.asdict(f) for f in describe(obj.Config)]
        rows.append({"name": name, "kind": k.value, "distribution": spec.distribution, "version": spec.version,
                     "summary": summary_of(obj), "options": options})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for row in rows:
        console.print(f"[bold]{row['name']}[/bold] ({row['kind']}, {row['distribution']} {row['version']}): {row['summary']}")
        if not row["options"]:
            console.print("  no settings")
            continue
        table = Table("setting", "type", "default", "doc", box=None)
        for o in row["options"]:
            table.add_row(o["name"], o["type"], o["default"] or "(required)", o["doc"])
        console.print(table)
    return 0
