"""Run directories and atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.rundir import RunDir, atomic_path, atomic_write_text


def test_create_makes_unique_timestamped_dirs(tmp_path: Path) -> None:
    a = RunDir.create("fl", root=tmp_path)
    b = RunDir.create("fl", root=tmp_path)
    assert a.path != b.path
    assert a.path.name.startswith("fl-") and a.path.parent == tmp_path


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_metrics_and_config(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_metrics({"round": 1, "loss": 0.5})
    run.append_metrics({"round": 2, "loss": 0.25})
    with open(run.file("metrics.jsonl"), "a") as f:
        f.write('{"round": 3, "lo')  # a crash mid-line
    assert [m["round"] for m in run.read_metrics()] == [1, 2]
    run.write_config({"rounds": 3, "partition": {"scheme": "iid"}})
    assert "rounds = 3" in run.file("config.toml").read_text()
