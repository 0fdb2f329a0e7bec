"""Shared edge fixtures: one trained default CNN per session, one conversion child that every export of the
session converts in, and one export per quantization, made on demand."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterator
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
def conversion_worker():
    """The real litert-torch conversion child, started once: each child spends seconds importing litert-torch."""
    from fedge.edge.convert import ConversionWorker

    with ConversionWorker("torch") as worker:
        yield worker


@pytest.fixture(scope="session")
def lend_worker(conversion_worker) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """``with lend_worker(): main([...])``: commands run inside convert their torch models in the session's child
    (the same real child a command starts, reused as ``fedge edge fit`` reuses it across candidates)."""
    from fedge.edge import convert, export_workflow, fit

    real = convert.ConversionWorker

    def make(source: str = "torch", **kwargs):
        # num_threads changes only the speed of a conversion, never its result: the session's child serves it.
        lent = source == "torch" and set(kwargs) <= {"num_threads"}
        return contextlib.nullcontext(conversion_worker) if lent else real(source, **kwargs)

    @contextlib.contextmanager
    def lend() -> Iterator[None]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(export_workflow, "ConversionWorker", make)
            mp.setattr(fit, "ConversionWorker", make)
            yield

    return lend


@pytest.fixture(scope="session")
def export_run(
    tmp_path_factory: pytest.TempPathFactory, trained_run: Path, lend_worker
) -> Callable[..., tuple[int, Path]]:
    """``export_run(*flags)``: run ``fedge edge export TRAINED_RUN *flags --json`` once per flag set.

    Returns (exit code, run directory); the conversion is shared by every test asking for the same flags.
    """
    from fedge.cli.app import main

    cache: dict[tuple[str, ...], tuple[int, Path]] = {}

    def run(*flags: str) -> tuple[int, Path]:
        if flags not in cache:
            out = tmp_path_factory.mktemp("edge")
            with lend_worker():
                code = main(["edge", "export", str(trained_run), *flags, "--out", str(out), "--json"])
            cache[flags] = (code, out)
        return cache[flags]

    return run


def _compile_c_array(run_dir: Path, tmp_path: Path) -> tuple[bytes, subprocess.CompletedProcess[str]]:
    source = (run_dir / "model_data.cc").read_text()
    body = source[source.index("{", source.index("g_model[]")) : source.index("};")]
    parsed = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body))
    argv = ["gcc", "-Wall", "-Wextra", "-Werror", "-x", "c", "-c", str(run_dir / "model_data.cc")]
    build = subprocess.run([*argv, "-o", str(tmp_path / "m.o")], capture_output=True, text=True, check=False)
    return parsed, build


@pytest.fixture(scope="session")
def compile_c_array() -> Callable[[Path, Path], tuple[bytes, subprocess.CompletedProcess[str]]]:
    """``compile_c_array(run_dir, tmp_path)``: the bytes of ``g_model[]`` in ``run_dir/model_data.cc``, and gcc's
    warning-free C compile of that file."""
    return _compile_c_array
