"""Ctrl-C on ``fedge train`` and ``fedge bench``: one line saying what was kept and how to resume, exit 130;
bench prints what it had measured first. Real torchrun jobs, stopped with SIGINT as a terminal would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _interrupt_when(proc: subprocess.Popen[str], ready: Callable[[], bool], timeout_s: float = 180) -> tuple[str, str]:
    from fedge.supervisor import terminate_tree

    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the test failed: leave nothing running behind it
            terminate_tree([proc.pid], grace_s=2.0)


def test_ctrl_c_on_train_says_what_was_kept_and_how_to_resume(tmp_path: Path, write_run) -> None:
    settings = write_run(tmp_path / "settings") / "config.toml"
    run_dir = tmp_path / "run"
    proc = _start(["train", str(settings), "--nproc", "2", "--steps", "100000", "--checkpoint-every", "3", "--out", str(run_dir)])

    def checkpointed() -> bool:
        return (run_dir / "checkpoints" / "latest.json").is_file()

    _, err = _interrupt_when(proc, checkpointed)

    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert "interrupted after step" in line and "of 100000" in line
    assert f"resume with: fedge train --resume {run_dir}" in line
    assert "Traceback" not in err
    assert not (run_dir / "pids.json").exists()  # the supervisor stopped torchrun and its workers


def test_ctrl_c_on_bench_prints_what_it_had_measured(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = _start(["bench", "strategies", "--nproc", "2", "--hidden", "16", "--reps", "100000", "--iters", "1", "--json",
                   "--out", str(out)])  # fmt: skip

    stdout, err = _interrupt_when(proc, lambda: (out / "partial.json").is_file())

    assert proc.returncode == 130, err
    assert '"impl": "ddp"' in stdout  # the rows so far, in the format asked for
    assert "interrupted: printed the" in err and "rows measured so far" in err
    assert "Traceback" not in err
