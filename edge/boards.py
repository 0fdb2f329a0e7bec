"""Boards as data: flash and RAM of the microcontrollers ``--target`` knows (``boards.toml``, shipped with
fedge) plus the user's own from a TOML file, and whether a model fits one."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fedge.config import from_mapping, load_toml
from fedge.errors import ConfigError

__all__ = ["Board", "Fit", "check_fit", "load_boards"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Board:
    """One target board. A limit of 0 means "not checked"."""

    name: str
    """The name ``--target`` takes."""
    flash_kb: int = 0
    """Flash a model may occupy, in KiB."""
    ram_kb: int = 0
    """RAM the tensor arena may occupy, in KiB."""
    notes: str = ""
    """Chip, clock, kernels: what a user should know."""

    def __post_init__(self) -> None:
        if self.flash_kb < 0 or self.ram_kb < 0:
            raise ValueError(f"board {self.name!r}: flash_kb and ram_kb must be >= 0")

    @property
    def flash_bytes(self) -> int:
        return self.flash_kb * 1024

    @property
    def ram_bytes(self) -> int:
        return self.ram_kb * 1024


@dataclass(frozen=True, slots=True)
class Fit:
    """Whether a model's file and arena fit a board."""

    board: Board
    size_bytes: int
    arena_bytes: int | None
    flash_ok: bool
    ram_ok: bool
    quantization: str | None = None
    """The model's quantization: the advice for a model already int8 is not "quantize to int8"."""

    @property
    def fits(self) -> bool:
        return self.flash_ok and self.ram_ok

    def message(self) -> str:
        """One line: what does not fit, with the sizes."""
        parts = []
        if not self.flash_ok:
            parts.append(f"the model needs {self.size_bytes:,} B of flash, the board has {self.board.flash_bytes:,} B")
        if not self.ram_ok:
            parts.append(
                f"the tensor arena needs {self.arena_bytes or 0:,} B of RAM, the board has {self.board.ram_bytes:,} B"
            )
        if not parts:
            return f"fits {self.board.name}"
        if self.quantization == "int8":
            advice = f"it is int8 already: make it smaller with fedge edge fit MODEL --target {self.board.name}"
        else:
            advice = f"try --quantize int8, or fedge edge fit MODEL --target {self.board.name} for a smaller model"
        return f"model does not fit {self.board.name}: " + "; ".join(parts) + "; " + advice


def _parse(tables: Mapping[str, Any], where: str) -> dict[str, Board]:
    boards = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: boards.{name} must be a table with flash_kb, ram_kb, notes")
        try:
            boards[name] = from_mapping(Board, {**table, "name": name}, where=f"{where}: boards.{name}")
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return boards


def load_boards(extra: str | Path | Mapping[str, Any] | None = None) -> dict[str, Board]:
    """The built-in boards, with the ``[boards.NAME]`` tables of ``extra`` (a TOML path or a mapping) laid over.

    Example::

        boards = load_boards("my-boards.toml")   # [boards.my-board] flash_kb = 512  ram_kb = 128
    """
    builtin = tomllib.loads(resources.files("fedge.edge").joinpath("boards.toml").read_text(encoding="utf-8"))
    boards = _parse(builtin["boards"], "boards.toml")
    if extra is not None:
        raw = load_toml(extra) if isinstance(extra, (str, Path)) else dict(extra)
        where = str(extra) if isinstance(extra, (str, Path)) else "boards"
        tables = raw.get("boards", {})
        if not isinstance(tables, Mapping) or not tables:
            raise ConfigError(
                f"{where} has no [boards.NAME] tables; add e.g. [boards.my-board] flash_kb = 512 ram_kb = 128"
            )
        boards.update(_parse(tables, where))
    return boards


def check_fit(board: Board, size_bytes: int, arena_bytes: int | None, *, quantization: str | None = None) -> Fit:
    """Compare a model's size and arena with the board's flash and RAM (limits of 0 are not checked)."""
    flash_ok = board.flash_kb == 0 or size_bytes <= board.flash_bytes
    ram_ok = board.ram_kb == 0 or (arena_bytes is not None and arena_bytes <= board.ram_bytes)
    return Fit(
        board=board,
        size_bytes=size_bytes,
        arena_bytes=arena_bytes,
        flash_ok=flash_ok,
        ram_ok=ram_ok,
        quantization=None if quantization is None else str(quantization),
    )
