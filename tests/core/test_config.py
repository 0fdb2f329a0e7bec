"""Typed config: TOML in, flags over it, validation errors as one line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from fedge.config import PartitionConfig, dump_toml, from_mapping, load_toml, merge, parse_partition
from fedge.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Inner:
    alpha: float = 0.5
    """A number."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Outer:
    name: str
    """Required."""
    rounds: int = 3
    """Rounds."""
    mode: Literal["sync", "async"] = "sync"
    """Mode."""
    sizes: tuple[int, ...] = (1, 2)
    """Sizes."""
    flag: bool = False
    """Flag."""
    inner: Inner = Inner()
    """Nested."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")


def test_strings_from_flags_are_coerced() -> None:
    cfg = from_mapping(Outer, {"name": "x", "rounds": "5", "sizes": "3,4", "flag": "true", "inner": {"alpha": "0.1"}})
    assert cfg == Outer(name="x", rounds=5, sizes=(3, 4), flag=True, inner=Inner(alpha=0.1))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "roundz": 1}, "unknown setting config.roundz; valid settings: flag, inner, mode, name"),
        ({"name": "x", "rounds": "many"}, "config.rounds must be an integer"),
        ({"name": "x", "mode": "fast"}, "config.mode must be one of sync, async"),
        ({"name": "x", "rounds": 0}, "rounds must be >= 1"),
        ({}, "config.name is required"),
        ({"name": "x", "inner": {"beta": 1}}, "unknown setting config.inner.beta"),
    ],
)
def test_bad_values_give_one_clear_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(Outer, data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_toml_round_trip_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "a"\nrounds = 2\n[inner]\nalpha = 0.25\n')
    raw = merge(load_toml(path), {"rounds": 7, "mode": None, "inner": {"alpha": None}})
    cfg = from_mapping(Outer, raw)
    assert (cfg.rounds, cfg.mode, cfg.inner.alpha) == (7, "sync", 0.25)
    text = dump_toml({"fl": cfg})
    assert from_mapping(Outer, load_toml_text(tmp_path, text)["fl"]) == cfg


def load_toml_text(tmp_path: Path, text: str) -> dict:
    p = tmp_path / "round.toml"
    p.write_text(text)
    return load_toml(p)


def test_missing_and_invalid_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", PartitionConfig(scheme="iid")),
        ("dirichlet:0.3", PartitionConfig(scheme="dirichlet", alpha=0.3)),
        ("shards:3", PartitionConfig(scheme="shards", shards_per_client=3)),
    ],
)
def test_parse_partition(spec: str, expected: PartitionConfig) -> None:
    assert parse_partition(spec) == expected
    assert str(parse_partition(spec)) == spec


@pytest.mark.parametrize("spec", ["random", "dirichlet:x", "dirichlet:-1", "shards:0", "iid:3"])
def test_parse_partition_rejects(spec: str) -> None:
    with pytest.raises(ConfigError, match="partition"):
        parse_partition(spec)


@dataclass(frozen=True, kw_only=True, slots=True)
class Opt:
    lr: float = 0.1


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", float("nan"), float("inf")])
def test_non_finite_numbers_are_refused_for_every_float_setting(bad: object) -> None:
    with pytest.raises(ConfigError, match="opt.lr must be a finite number"):
        from_mapping(Opt, {"lr": bad}, where="opt")


def test_describe_reads_each_settings_doc_once() -> None:
    from fedge.config import PartitionConfig, describe

    docs = {f.name: f for f in describe(PartitionConfig)}
    assert docs["scheme"].type == "iid | dirichlet | shards" and docs["scheme"].default == "iid"
    assert docs["alpha"].doc == "Dirichlet concentration; smaller is more skewed (``dirichlet`` only)."
