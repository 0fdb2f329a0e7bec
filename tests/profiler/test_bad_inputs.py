"""``fedge profile report`` against a newcomer's mistakes: one line on stderr, the right exit code, never a
traceback; a run directory is never written into; Ctrl-C is one line."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.cli.app import main

BIN = Path(sys.executable).parent
NCCL = "ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)"


def _good(path: Path, builder, rank: int = 0) -> Path:
    builder(rank=rank).step(1, 0, 500).step(2, 500, 500).kernel("gemm", 20, 100).kernel(NCCL, 60, 80, stream=20).write(path)
    return path


def _traces(tmp: Path, builder) -> Path:
    d = tmp / "traces"
    d.mkdir(exist_ok=True)
    _good(d / "rank0_trace.json", builder)
    return d


def _dangling_link(tmp: Path, builder) -> list[str]:
    d = _traces(tmp, builder)
    (d / "rank1_trace.json").symlink_to(tmp / "gone.json")
    return [str(d)]


def _directory_named_like_a_trace(tmp: Path, builder) -> list[str]:
    d = _traces(tmp, builder)
    (d / "rank1_trace.json.gz").mkdir()
    return [str(d)]


def _truncated_rank(tmp: Path, builder) -> list[str]:
    d = _traces(tmp, builder)
    data = gzip.compress(_good(tmp / "whole.json", builder, rank=1).read_bytes())
    (d / "rank1_trace.json.gz").write_bytes(data[: len(data) // 2])
    return [str(d)]


def _file(tmp: Path, name: str, data: bytes) -> list[str]:
    (tmp / name).write_bytes(data)
    return [str(tmp / name)]


def _run_dir(tmp: Path, builder, legacy_file: str) -> list[str]:
    run = tmp / "old-run"
    run.mkdir()
    (run / legacy_file).write_text("{}")
    return [str(_traces(tmp, builder)), "--out", str(run)]


# (case id, arguments built in tmp_path, exit code, substring of the one line on stderr)
CASES = [
    ("missing-path", lambda t, b: [str(t / "nope")], 1, "no such file or directory"),
    ("empty-dir", lambda t, b: [str(t)], 1, "no trace files (*.json, *.json.gz) in this directory"),
    ("bad-mode", lambda t, b: [str(_traces(t, b)), "--mode", "tensorboard"], 1, "unknown --mode 'tensorboard'; valid: fedge, hta"),
    ("negative-top", lambda t, b: [str(_traces(t, b)), "--top", "-1"], 1, "--top must be >= 0, got -1"),
    ("dangling-symlink", _dangling_link, 2, "a symbolic link to"),
    ("directory-named-like-a-trace", _directory_named_like_a_trace, 2, "a directory, not a trace file"),
    ("one-rank-truncated", _truncated_rank, 2, "truncated gzip stream"),
    ("not-json", lambda t, b: _file(t, "trace.json", b"hello"), 1, "not a JSON trace"),
    ("json-list-of-numbers", lambda t, b: _file(t, "trace.json", b"[1, 2, 3]"), 1, "traceEvents holds values that are not events"),
    ("empty-file", lambda t, b: _file(t, "trace.json", b""), 1, "no traceEvents array found"),
    ("gzip-garbage", lambda t, b: _file(t, "trace.json.gz", b"\x1f\x8bnot really gzip"), 1, "no trace could be read"),
    ("option-without-analysis", lambda t, b: [str(_traces(t, b)), "-o", "top=3"], 1, "-o expects ANALYSIS.SETTING=VALUE"),
    ("option-unknown-analysis", lambda t, b: [str(_traces(t, b)), "-o", "nope.x=1"], 1, "no analysis named 'nope'"),
    ("option-unknown-setting", lambda t, b: [str(_traces(t, b)), "-o", "stragglers.speed=1"], 1, "unknown setting analysis stragglers.speed"),
    ("option-nan", lambda t, b: [str(_traces(t, b)), "-o", "stragglers.min_delay_us=nan"], 1, "must be a finite number"),
    ("option-out-of-range", lambda t, b: [str(_traces(t, b)), "-o", "kernels.top=-3"], 1, "top must be >= 0, got -3"),
    ("out-holds-an-edge-run", lambda t, b: _run_dir(t, b, "edge-report.json"), 1, "already holds a run; choose a new directory or pass --overwrite"),
    ("out-holds-an-fl-run", lambda t, b: _run_dir(t, b, "metrics.jsonl"), 1, "already holds a run"),
    ("out-is-a-file", lambda t, b: [str(_traces(t, b)), "--out", _file(t, "taken", b"x")[0]], 1, "is a file, not a directory"),
    ("out-under-a-file", lambda t, b: [str(_traces(t, b)), "--out", _file(t, "taken", b"x")[0] + "/run"], 1, "cannot write (Not a directory)"),
    ("out-unwritable", lambda t, b: [str(_traces(t, b)), "--out", "/proc/fedge-run"], 1, "--out /proc/fedge-run: cannot write"),
    ("html-is-a-directory", lambda t, b: [str(_traces(t, b)), "--html", str(t)], 1, "cannot write (Is a directory); give a writable path"),
    ("html-unwritable", lambda t, b: [str(_traces(t, b)), "--html", "/proc/fedge.html"], 1, "--html /proc/fedge.html: cannot write"),
    ("overwrite-and-nothing-else", lambda t, b: [str(t / "nope"), "--overwrite"], 1, "no such file or directory"),
]


DIFF_CASES = [
    ("missing-candidate", lambda t, b: [str(_traces(t, b)), str(t / "nope")], 1, "no such file or directory"),
    ("unreadable-baseline", lambda t, b: [_file(t, "trace.json", b"hello")[0], str(_traces(t, b))], 1, "no trace could be read"),
    ("one-rank-unreadable", lambda t, b: [*_dangling_link(t, b), str(t / "traces" / "rank0_trace.json")], 2, "a symbolic link to"),
    ("report-option-in-diff", lambda t, b: [str(_traces(t, b)), str(_traces(t, b)), "-o", "kernels.top=3"], 1,
     "analysis 'kernels' does not run here but in fedge profile report"),
    ("negative-show", lambda t, b: [str(_traces(t, b)), str(_traces(t, b)), "-o", "diff.show=-1"], 1, "must be >= 0"),
    ("bad-mode", lambda t, b: [str(_traces(t, b)), str(_traces(t, b)), "--mode", "tb"], 1, "unknown --mode 'tb'"),
    ("out-holds-a-run", lambda t, b: [str(_traces(t, b)), *_run_dir(t, b, "model.pt")], 1, "already holds a run"),
]
TABLE = [("report", *c) for c in CASES] + [("diff", *c) for c in DIFF_CASES]


@pytest.mark.parametrize(("command", "args", "code", "line"), [c[:1] + c[2:] for c in TABLE],
                         ids=[f"{c[0]}-{c[1]}" for c in TABLE])
def test_bad_input_is_one_line_with_the_right_exit_code(tmp_path, builder, capsys, command, args, code, line):
    # Prepare
    argv = ["profile", command, *args(tmp_path, builder)]
    # Execute
    got = main(argv)
    # Assert: the exit code, and the line (exit 2 names each skipped file once, as a warning)
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "warning: command" not in x]
    assert got == code, err
    assert any(line in x for x in err), err
    assert "Traceback" not in "\n".join(err)
    if code == 1:
        assert len(err) == 1, err


def test_a_second_report_into_the_same_out_is_refused_and_leaves_the_first_intact(tmp_path, builder, capsys):
    # Prepare: a first report run
    traces, out = _traces(tmp_path, builder), tmp_path / "prof"
    assert main(["profile", "report", str(traces), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Execute
    refused = main(["profile", "report", str(traces), "--out", str(out), "--mode", "hta"])
    # Assert
    assert refused == 1 and "already holds a profile run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces it whole
    assert main(["profile", "report", str(traces), "--out", str(out), "--mode", "hta", "--overwrite"]) == 0
    assert 'mode = "hta"' in (out / "config.toml").read_text()


def test_a_failed_report_leaves_no_run_directory_behind(tmp_path, builder, capsys):
    # Prepare: nothing readable, into a new --out
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "rank0_trace.json").write_text("hello")
    out = tmp_path / "prof"
    # Execute
    assert main(["profile", "report", str(tmp_path / "traces"), "--out", str(out)]) == 1
    # Assert: the retry is not refused
    assert not out.exists()
    _good(tmp_path / "traces" / "rank0_trace.json", builder)
    assert main(["profile", "report", str(tmp_path / "traces"), "--out", str(out)]) == 0


def _blocked_on_fifo(pid: int) -> bool:
    pids = [pid, *(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    for p in pids:
        try:
            if Path(f"/proc/{p}/wchan").read_text().strip() in ("wait_for_partner", "fifo_open"):
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize(("ranks", "sig"), [(1, signal.SIGINT), (2, signal.SIGINT), (1, signal.SIGTERM)],
                         ids=["one-file", "worker-per-file", "sigterm"])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, ranks, sig):
    # Prepare: rank files that are FIFOs nobody writes, so reading blocks until interrupted
    for rank in range(ranks):
        os.mkfifo(tmp_path / f"rank{rank}_trace.json")
    target = tmp_path if ranks > 1 else tmp_path / "rank0_trace.json"
    proc = subprocess.Popen([str(BIN / "fedge"), "profile", "report", str(target)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _blocked_on_fifo(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    # Execute
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # the test failed: leave nothing running behind it
            from fedge.supervisor import terminate_tree

            terminate_tree([proc.pid], grace_s=2.0)
    # Assert
    err = proc.stderr.read().strip().splitlines()
    assert code == 130, err
    assert len(err) == 1 and "interrupted while reading the traces" in err[0], err
