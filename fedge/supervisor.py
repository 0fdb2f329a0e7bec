"""The one process supervisor: start children that cannot outlive us, watch them, stop them and all they started.

Used by the Flower launcher (SuperLink, SuperNodes, warm workers) and the torchrun launcher alike. Every
child starts in its own session with its PID recorded (``pids.json``) and is told to die with this process
(Linux ``PR_SET_PDEATHSIG``); :meth:`Supervisor.stop` ends each child's process group and every descendant,
also those started detached (Flower's SuperExec, torchrun's workers). Every wait has a deadline. Process
trees come from psutil. Example::

    with Supervisor(run.path) as sup:
        link = sup.start("superlink", ["flower-superlink", ...])
        wait_for_port("127.0.0.1", 9092, timeout_s=30, alive=link.proc)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psutil

from fedge.errors import RuntimeFailure
from fedge.rundir import atomic_write_text

__all__ = [
    "Child",
    "Supervisor",
    "alive",
    "descendants",
    "free_port",
    "kill_recorded",
    "processes_with_env",
    "sigterm_as_interrupt",
    "terminate_tree",
    "wait_for_port",
]

logger = logging.getLogger(__name__)

_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout_s: float, alive: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises:
        RuntimeFailure: the deadline passed, or ``alive`` exited first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            name = str(alive.args[0] if isinstance(alive.args, list) else alive.args)
            raise RuntimeFailure(f"process {name} exited with code {alive.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(_POLL_S)
    raise RuntimeFailure(f"nothing listened on {host}:{port} within {timeout_s:.0f} s")


def _prctl(option: int, value: int) -> int:
    if not sys.platform.startswith("linux"):
        return -1
    import ctypes

    try:
        return int(ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0))
    except OSError:
        return -1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM it when the parent dies, so a killed supervisor
    # leaves no children behind.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid``."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def cmdline(pid: int) -> str:
    """The command line of ``pid``, or "" when it is gone."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def processes_with_env(name: str, prefix: str) -> list[int]:
    """Live processes (not this one) whose environment variable ``name`` starts with ``prefix``.

    Children inherit such a mark even when their parent died, so it finds orphans a process tree misses.
    """
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            value = proc.environ().get(name)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if value is not None and value.startswith(prefix) and alive(proc.pid):
            found.append(proc.pid)
    return found


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def terminate_tree(roots: Sequence[int], *, grace_s: float = 5.0) -> list[int]:
    """SIGTERM ``roots``, their process groups and all their descendants; SIGKILL what is left after ``grace_s``.

    Returns:
        The descendants (not ``roots``) that were signalled.
    """
    pids = list(dict.fromkeys([*roots, *(d for r in roots for d in descendants(r))]))
    groups = set()
    for pid in roots:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(pid))
    groups.discard(os.getpgid(0))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(_POLL_S)
    # Descendants may have started meanwhile (a ClientApp launched during shutdown).
    pids = list(dict.fromkeys([*pids, *(d for r in roots for d in descendants(r))]))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _signal_all([p for p in pids if alive(p)], signal.SIGKILL)
    deadline = time.monotonic() + 2.0  # let the kills land, so orphans are re-parented before anyone reaps
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(_POLL_S / 2)
    return [p for p in pids if p not in roots]


def _reap(pids: Sequence[int], *, timeout_s: float) -> None:
    # Descendants orphaned by a killed parent are re-parented to us (a child subreaper while children run);
    # collect their exit status so no zombie is left behind.
    todo, deadline = set(pids), time.monotonic() + timeout_s
    while todo and time.monotonic() < deadline:
        for pid in list(todo):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not (or no longer) our child: its own parent or init reaps it
                todo.discard(pid)
                continue
            if done:
                todo.discard(pid)
        if todo:
            time.sleep(_POLL_S)


def _reap_orphans(exclude: Sequence[int]) -> None:
    # Zombies re-parented to us (a subreaper) after their parent was killed.
    for child in psutil.Process().children():
        if child.pid in exclude:
            continue
        with contextlib.suppress(psutil.Error):
            if child.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, os.WNOHANG)


def kill_recorded(pids_file: Path, *, patterns: Sequence[str]) -> int:
    """Stop processes a previous (killed) supervisor recorded in ``pids_file`` whose command line still matches.

    Returns:
        How many were still running.
    """
    try:
        recorded = json.loads(pids_file.read_text(encoding="utf-8"))
        pids = [int(p["pid"]) for p in recorded]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    live = [p for p in pids if alive(p) and any(s in cmdline(p) for s in patterns)]
    if live:
        terminate_tree(live)
    return len(live)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt, so a scheduler's stop cleans up like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Child:
    """One started process: its name, Popen handle and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class Supervisor:
    """Children of this process, each in its own session, with logs in ``workdir/logs``.

    Args:
        workdir: logs go to ``workdir/logs/<name>.log``; ``workdir/pids.json`` lists the running children.
        env: extra environment for every child (on top of ``os.environ``).
        mark: an environment variable set in every child (``name=value``) by which :meth:`stop` also finds
            descendants that were re-parented away from the tree (e.g. detached by a killed parent).
    """

    def __init__(self, workdir: str | Path, *, env: Mapping[str, str] | None = None, mark: tuple[str, str] | None = None):
        self.workdir = Path(workdir).resolve()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.mark = mark
        self.children: list[Child] = []
        # Become a child subreaper (Linux) so orphaned descendants are ours to reap at stop().
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a child gets: ours, the supervisor's ``env``, the mark, then ``extra``."""
        env = {**os.environ, **self.env}
        if self.mark is not None:
            env[self.mark[0]] = self.mark[1]
        env.update(extra or {})
        return env

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
    ) -> Child:
        """Start ``argv`` as child ``name``: own session, dies with us, output appended to its log."""
        log = self.workdir / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.environ(env),
                cwd=self.workdir if cwd is None else cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
            )
        child = Child(name, proc, log)
        self.children.append(child)
        self._record_pids()
        return child

    def _record_pids(self) -> None:
        atomic_write_text(
            self.workdir / "pids.json",
            json.dumps([{"name": c.name, "pid": c.proc.pid} for c in self.children], indent=2) + "\n",
        )

    def dead(self) -> list[Child]:
        """Children that have exited."""
        return [c for c in self.children if c.proc.poll() is not None]

    def find(self, pattern: str) -> list[int]:
        """PIDs of descendants of our children whose command line contains ``pattern``."""
        return [p for c in self.children for p in descendants(c.proc.pid) if pattern in cmdline(p)]

    def stop(self, *, grace_s: float = 5.0) -> None:
        """Stop every child, its process group and all descendants; idempotent."""
        roots = [c.proc.pid for c in self.children]
        strays = [p for p in processes_with_env(*self.mark) if p not in roots] if self.mark else []
        others = terminate_tree(roots + strays, grace_s=grace_s) if roots or strays else []
        others += strays
        for c in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=grace_s)
        _reap(others, timeout_s=grace_s)
        _reap_orphans(exclude=roots)
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        self.children.clear()
        with contextlib.suppress(OSError):
            (self.workdir / "pids.json").unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
