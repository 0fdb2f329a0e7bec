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


# -- the run-directory rule: a run is never mixed with another ------------------------------------------

from fedge.errors import ConfigError, StorageError
from fedge.rundir import RUN_MARKER, run_kind


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_new_run_is_marked_with_its_kind(tmp_path: Path) -> None:
    run = RunDir.create("edge", tmp_path / "out")
    assert run.kind == "edge" and (run.path / RUN_MARKER).is_file()


@pytest.mark.parametrize("legacy", ["config.toml", "metrics.jsonl", "model.pt", "edge-report.json", "ca.crt"])
def test_a_second_run_into_the_same_out_is_refused_and_leaves_the_first_byte_identical(
    tmp_path: Path, legacy: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / legacy).write_text("first run")
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="already holds a run; choose a new directory or pass --overwrite"):
        RunDir.create("fl", out)
    assert _snapshot(out) == before


def test_refusal_names_resume_when_the_command_has_it(tmp_path: Path) -> None:
    RunDir.create("fl", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"already holds an fl run; choose a new directory, --resume .* or pass --overwrite"):
        RunDir.create("fl", tmp_path / "out", resumable=True)


def test_an_empty_dir_or_unrelated_files_may_be_used(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    run = RunDir.create("profile", tmp_path)
    assert run.kind == "profile" and (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_reopens_only_a_run_of_its_kind(tmp_path: Path) -> None:
    first = RunDir.create("train", tmp_path / "t")
    first.append_metrics({"step": 1})
    again = RunDir.create("train", tmp_path / "t", resume=True)
    assert again.read_metrics() == [{"step": 1}]
    with pytest.raises(ConfigError, match="holds a train run, not an fl run"):
        RunDir.create("fl", tmp_path / "t", resume=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        RunDir.create("fl", tmp_path / "empty", resume=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        RunDir.create("fl", tmp_path / "t", resume=True, overwrite=True)


def test_overwrite_replaces_the_run_whole_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with RunDir.create("fl", out) as old:
        old.write_text("old.txt", "old")
    with RunDir.create("fl", out, overwrite=True) as new:
        new.write_text("new.txt", "new")
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it


def test_overwrite_that_fails_brings_the_old_run_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with RunDir.create("fl", out) as old:
        old.write_text("old.txt", "old")
    before = _snapshot(out)
    with pytest.raises(KeyboardInterrupt), RunDir.create("fl", out, overwrite=True) as new:
        new.write_text("half.txt", "half")
        raise KeyboardInterrupt
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_that_is_a_file_or_unwritable_is_one_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a directory"):
        RunDir.create("fl", tmp_path / "file")
    with pytest.raises(StorageError, match="is not a directory"):
        RunDir.create("fl", root=tmp_path / "file")
    with pytest.raises(StorageError, match="only .* MiB free"):
        RunDir.create("fl", tmp_path / "big", min_free_bytes=2**62)


def test_read_only_out_is_one_storage_error(tmp_path: Path) -> None:
    import os
    import subprocess

    if os.geteuid() == 0:
        # root ignores permission bits: use a read-only bind mount of a tmpfs-free directory instead.
        ro = tmp_path / "ro"
        ro.mkdir()
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True, check=False)
        if mounted.returncode != 0:
            pytest.skip(f"cannot make a read-only mount here: {mounted.stderr.decode().strip()}")
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True, check=False)
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
    try:
        with pytest.raises(StorageError, match="Read-only file system|Permission denied"):
            RunDir.create("fl", ro / "run")
        assert run_kind(ro) is None
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], capture_output=True, check=False)
