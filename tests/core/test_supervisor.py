"""The one process supervisor: children in their own sessions, stopped with everything they started."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from fedge.errors import RuntimeFailure
from fedge.supervisor import Supervisor, alive, descendants, free_port, kill_recorded, terminate_tree, wait_for_port

# A child that starts a detached grandchild in a new session and then sleeps: a plain kill of the child misses it.
_SPAWNER = (
    "import subprocess, sys, time;"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True);"
    "print('started', flush=True); time.sleep(60)"
)


def test_stop_ends_children_and_their_detached_descendants(tmp_path: Path) -> None:
    with Supervisor(tmp_path, mark=("FEDGE_SUPERVISOR_TEST", str(tmp_path))) as sup:
        child = sup.start("spawner", [sys.executable, "-c", _SPAWNER])
        deadline = time.monotonic() + 20
        while not descendants(child.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchildren = descendants(child.proc.pid)
        assert grandchildren, "the grandchild never started"
        assert json.loads((tmp_path / "pids.json").read_text())[0]["name"] == "spawner"
    assert not alive(child.proc.pid)
    assert not any(alive(p) for p in grandchildren)
    assert not (tmp_path / "pids.json").exists()
    assert "started" in (tmp_path / "logs" / "spawner.log").read_text()


def test_dead_lists_children_that_exited(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        quick = sup.start("quick", [sys.executable, "-c", "raise SystemExit(4)"])
        slow = sup.start("slow", [sys.executable, "-c", "import time; time.sleep(30)"])
        quick.proc.wait(timeout=20)
        assert [c.name for c in sup.dead()] == ["quick"] and quick.proc.returncode == 4
    assert not alive(slow.proc.pid)


def test_wait_for_port_has_a_deadline_and_notices_a_dead_process(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(RuntimeFailure, match=f"nothing listened on 127.0.0.1:{port} within 0 s"):
        wait_for_port("127.0.0.1", port, timeout_s=0.3)
    with Supervisor(tmp_path) as sup:
        child = sup.start("dies", [sys.executable, "-c", "raise SystemExit(2)"])
        with pytest.raises(RuntimeFailure, match="exited with code 2 before listening"):
            wait_for_port("127.0.0.1", port, timeout_s=20, alive=child.proc)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        wait_for_port("127.0.0.1", port, timeout_s=5)


def test_kill_recorded_stops_what_a_killed_supervisor_left(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    child = sup.start("left", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert kill_recorded(tmp_path / "pids.json", patterns=["time.sleep(60)"]) == 1
    child.proc.wait(timeout=20)
    assert not alive(child.proc.pid)
    sup.stop()


def test_terminate_tree_escalates_to_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    with Supervisor(tmp_path) as sup:
        child = sup.start("stubborn", [sys.executable, "-c", code])
        deadline = time.monotonic() + 20
        while "ready" not in (tmp_path / "logs" / "stubborn.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        terminate_tree([child.proc.pid], grace_s=0.5)
        child.proc.wait(timeout=10)
        assert child.proc.returncode == -9
