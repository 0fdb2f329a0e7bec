"""Boards as data: the shipped table, user boards from TOML, and the fit check's one-line message."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.edge.boards import check_fit, load_boards
from fedge.errors import ConfigError


def test_shipped_boards_have_the_documented_flash_and_ram() -> None:
    boards = load_boards()

    assert (boards["arduino-nano-33-ble-sense"].flash_kb, boards["arduino-nano-33-ble-sense"].ram_kb) == (1024, 256)
    assert (boards["esp32"].flash_kb, boards["esp32"].ram_kb) == (4096, 520)
    assert (boards["stm32f746"].flash_kb, boards["stm32f746"].ram_kb) == (1024, 320)
    assert (boards["rpi-pico"].flash_kb, boards["rpi-pico"].ram_kb) == (2048, 264)
    assert "generic" in boards


def test_user_boards_from_toml_add_to_and_override_the_shipped_ones(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "boards.toml"
    path.write_text(
        '[boards.tiny]\nflash_kb = 16\nram_kb = 2\nnotes = "test"\n[boards.esp32]\nflash_kb = 8192\nram_kb = 520\n'
    )

    # Execute
    boards = load_boards(path)

    # Assert
    assert boards["tiny"].flash_bytes == 16 * 1024 and boards["tiny"].ram_bytes == 2048
    assert boards["esp32"].flash_kb == 8192
    assert "rpi-pico" in boards


def test_a_bad_user_board_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "boards.toml"
    path.write_text('[boards.bad]\nflash_kb = "lots"\n')

    with pytest.raises(ConfigError, match="flash_kb must be an integer"):
        load_boards(path)


def test_fit_message_names_both_sizes_of_what_does_not_fit() -> None:
    board = load_boards()["arduino-nano-33-ble-sense"]

    fit = check_fit(board, size_bytes=2_000_000, arena_bytes=300_000)

    assert not fit.fits
    assert "2,000,000 B of flash, the board has 1,048,576 B" in fit.message()
    assert "300,000 B of RAM, the board has 262,144 B" in fit.message()
    assert check_fit(board, size_bytes=20_000, arena_bytes=6_000).fits
    assert check_fit(load_boards()["generic"], size_bytes=10**9, arena_bytes=10**9).fits


def test_a_model_already_int8_is_not_told_to_quantize_to_int8() -> None:
    board = load_boards()["arduino-nano-33-ble-sense"]

    as_int8 = check_fit(board, size_bytes=2_000_000, arena_bytes=1, quantization="int8").message()
    as_float = check_fit(board, size_bytes=2_000_000, arena_bytes=1, quantization="none").message()

    assert "--quantize int8" not in as_int8 and "fedge edge fit" in as_int8
    assert "try --quantize int8" in as_float
