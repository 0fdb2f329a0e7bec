"""``fedge plugins``: what is installed, by kind, with distribution, version and summary."""

from __future__ import annotations

import json
import warnings
from typing import Annotated

import typer

from fedge.errors import ConfigError
from fedge.registry import Kind, Registry, summary_of


def command(
    kind: Annotated[
        str | None, typer.Option("--kind", "-k", help=f"Only this kind: {', '.join(k.value for k in Kind)}.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {name, kind, distribution, version, summary}.")] = False,
) -> int:
    """List installed plugins: strategies, aggregators, analyses, exporters, datasets, models."""
    if kind is not None and kind not in {k.value for k in Kind}:
        raise ConfigError(f"unknown plugin kind {kind!r}; valid: {', '.join(k.value for k in Kind)}")
    kinds = [Kind(kind)] if kind else list(Kind)
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
