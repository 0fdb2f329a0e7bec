"""Ctrl-C during an ``--overwrite`` run: the new run is discarded and the replaced one comes back, and the line
says so (it must not offer to resume a directory that is about to hold the old run again)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.errors import Interrupted
from fedge.plugins.fl import FlConfig
from fedge.plugins.fl.runner import _interrupted
from fedge.plugins.train.cli import _interrupted_line
from fedge.plugins.train.config import TrainConfig
from fedge.rundir import RunDir


@pytest.mark.parametrize("kind", ["train", "fl"])
def test_interrupted_overwrite_names_the_restored_run(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "run"
    with RunDir.create(kind, out) as old:
        old.write_text("old.txt", "the first run")
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())

    with pytest.raises(Interrupted) as caught, RunDir.create(kind, out, overwrite=True) as run:
        run.write_text("new.txt", "half of the second run")
        if kind == "train":
            raise Interrupted(_interrupted_line(TrainConfig(steps=50), run, 7))
        raise _interrupted(run, FlConfig(rounds=5))

    line = str(caught.value)
    assert "the new run was discarded" in line and str(out) in line
    assert "resume with" not in line
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing left aside
