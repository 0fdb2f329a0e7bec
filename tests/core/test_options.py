"""CLI options made from a Config dataclass: typed and documented once, in the Config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import typer
from typer.testing import CliRunner

from fedge.cli.options import config_options


@dataclass(frozen=True, kw_only=True, slots=True)
class JobConfig:
    rounds: int = 5
    """Federated rounds."""
    fraction_train: float = 1.0
    """Share of clients sampled per round."""
    engine: Literal["deployment", "simulation"] = "deployment"
    """Where the clients run."""
    tls: bool = False
    """TLS with a development CA."""
    data: Path | None = None
    """A ``.npz`` file."""
    extra: dict[str, Any] | None = None
    """A table; no flag."""


def _app(seen: list[dict[str, Any]]) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @config_options(JobConfig, exclude=("extra",), short={"rounds": "-r"})
    def run(config: Path | None = None, *, as_json: bool = False, settings: dict[str, Any]) -> None:
        """Run it."""
        seen.append({"config": config, "as_json": as_json, **settings})

    return app


def test_flags_come_from_the_fields_and_only_given_ones_are_passed() -> None:
    seen: list[dict[str, Any]] = []
    result = CliRunner().invoke(_app(seen), ["-r", "3", "--engine", "simulation", "--tls", "--data", "d.npz"])
    assert result.exit_code == 0, result.output
    assert seen == [{"config": None, "as_json": False, "rounds": 3, "engine": "simulation", "tls": True,
                     "data": Path("d.npz")}]


def test_help_shows_each_settings_doc_and_default() -> None:
    result = CliRunner().invoke(_app([]), ["--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert "--fraction-train" in result.output and "Share of clients sampled per round. (default: 1.0)" in result.output
    assert "Where the clients run. One of: deployment | simulation." in result.output
    assert "--extra" not in result.output


def test_a_wrong_type_is_typers_one_line() -> None:
    result = CliRunner().invoke(_app([]), ["--rounds", "many"])
    assert result.exit_code == 2 and "'many' is not a valid integer" in result.output
