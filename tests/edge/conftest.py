"""Shared edge fixtures: one trained default CNN per session, and one export per quantization, made on demand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits():
    from fedge.plugins.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    """A fedge run directory as `fedge fl run` / `fedge train` leave it: the default cnn, trained on digits."""
    from fedge.plugins.models import build_model, save_model
    from fedge.plugins.train.single_process import train_epochs

    model = build_model("cnn", {}, input_shape=digits.input_shape, num_classes=digits.num_classes)
    train_epochs(model, digits.x_train, digits.y_train, epochs=3, seed=0)
    run = tmp_path_factory.mktemp("fl-run")
    save_model(model, run, extra={"dataset": "digits"})
    return run


@pytest.fixture(scope="session")
def export_run(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> Callable[..., tuple[int, Path]]:
    """``export_run(*flags)``: run ``fedge edge export TRAINED_RUN *flags --json`` once per flag set.

    Returns (exit code, run directory); the conversion is shared by every test asking for the same flags.
    """
    from fedge.cli.app import main

    cache: dict[tuple[str, ...], tuple[int, Path]] = {}

    def run(*flags: str) -> tuple[int, Path]:
        if flags not in cache:
            out = tmp_path_factory.mktemp("edge")
            code = main(["edge", "export", str(trained_run), *flags, "--out", str(out), "--json"])
            cache[flags] = (code, out)
        return cache[flags]

    return run
