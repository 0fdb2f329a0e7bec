"""Start a job under torchrun (``python -m torch.distributed.run``) and watch it until it ends.

fedge does not launch ranks itself: rendezvous, multi-node, ``--nnodes MIN:MAX`` and ``--max-restarts``
are torchrun's. This module builds the torchrun command line, checks what can be checked before any
process starts (strategy name, world size, a reachable rendezvous endpoint), streams progress from the
run directory, and turns a failed job into one line. torchrun's own output goes to ``RUN_DIR/train.log``.

Multi-node: every node runs ``fedge train`` with the same settings and ``--rdzv-endpoint``; each is one
torchrun agent in a c10d rendezvous, which numbers the nodes. The workers of each node report that number
in :func:`node_file`, so every node's ``fedge train`` can say which node it is and where rank 0 writes.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError, FedgeError, RuntimeFailure
from fedge.plugins.train.config import TrainConfig, parse_nnodes
from fedge.rundir import RunDir

__all__ = ["check_rendezvous", "launch", "node_file", "torchrun_command"]

_STOP_GRACE_S = 15.0


def torchrun_command(cfg: TrainConfig, module: str, args: Sequence[str]) -> list[str]:
    """The ``python -m torch.distributed.run ...`` command line for ``cfg`` running ``python -m module args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.nproc)]
    cmd += ["--max-restarts", str(cfg.max_restarts), "--monitor-interval", "0.2"]
    if cfg.rdzv_endpoint:
        t, last_call = max(1, int(cfg.rdzv_timeout_s)), max(1, math.ceil(cfg.rdzv_last_call_s))
        lo, hi = parse_nnodes(cfg.nnodes)
        # The join deadline covers the last call too: --rdzv-timeout is the wait for MIN nodes to show up.
        join = t + last_call if lo < hi else t
        cmd += ["--nnodes", cfg.nnodes, "--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint]
        conf = f"join_timeout={join},read_timeout={t},last_call_timeout={last_call}"
        cmd += ["--rdzv-id", cfg.rdzv_id, "--rdzv-conf", conf]
    else:
        cmd += ["--standalone", "--nnodes", "1"]
    return [*cmd, "--module", module, *args]


def _is_local(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host.strip("[]"), 0))
        return True
    except OSError:
        return False


def check_rendezvous(endpoint: str, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for a remote rendezvous endpoint to accept a TCP connection.

    A local endpoint is skipped: this node's torchrun will host the store there.

    Raises:
        RuntimeFailure: the endpoint did not answer in time.
    """
    host, _, port = endpoint.rpartition(":")
    if _is_local(host):
        return
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as err:
            last = err.strerror or type(err).__name__
        if time.monotonic() >= deadline:
            raise RuntimeFailure(
                f"cannot reach the rendezvous endpoint {endpoint} within {timeout_s:g}s ({last}); check HOST:PORT, "
                "that fedge train runs on that host with the same endpoint, and firewalls (or raise --rdzv-timeout)"
            )
        time.sleep(0.5)


def _first_error(run: RunDir) -> FedgeError | None:
    files = sorted(run.file("errors").glob("rank-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
    found: list[tuple[int, str]] = []
    for path in files:
        first_line = (path.read_text(encoding="utf-8").strip().splitlines() or [""])[0]
        word, _, text = first_line.partition(" ")
        found.append((int(word) if word.isdigit() else 70, text))
    if not found:
        return None
    code, message = min(found, key=lambda f: (f[0] != 1, 0))  # a user error explains more than its fallout
    err = ConfigError(message) if code == 1 else RuntimeFailure(message)
    err.exit_code = code
    return err


def _log_reason(text: str, cfg: TrainConfig) -> str:
    """Why torchrun failed, from its output in ``train.log`` (this launch's part)."""
    if "RendezvousTimeoutError" in text:
        return (
            f"the rendezvous timed out before enough nodes joined (--nnodes {cfg.nnodes}, --rdzv-timeout "
            f"{cfg.rdzv_timeout_s:g}s); start every node with the same --rdzv-endpoint and --rdzv-id"
        )
    if "RendezvousClosedError" in text:
        return f"another node closed the rendezvous {cfg.rdzv_id!r} (it failed or finished); start every node again"
    if "RendezvousConnectionError" in text:
        return f"cannot reach the rendezvous store at {cfg.rdzv_endpoint}: the node at that address stopped or is unreachable"
    # torchrun's "Root Cause (first observed failure)" block names the rank and its exit code or signal.
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text, re.DOTALL)
    if m is None:
        return "a worker failed"
    rank, code = int(m.group(1)), int(m.group(2))
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} was killed by {name}"
    return f"rank {rank} exited with code {code}"


def node_file(run: RunDir) -> Path:
    """Where this node's workers describe the node (``nodes/<host>-<pid>.json``; multi-node jobs only).

    Each node has its own file, so nodes that share one run directory do not overwrite each other's.
    """
    return run.file("nodes") / f"{socket.gethostname()}-{os.getpid()}.json"


def launch(
    cfg: TrainConfig,
    run: RunDir,
    *,
    module: str = "fedge.plugins.train.worker",
    on_progress: Callable[[RunDir], None] | None = None,
) -> None:
    """Run ``module`` under torchrun for ``cfg`` with ``run`` as its run directory; return when it succeeds.

    Raises:
        ConfigError: a worker reported a user error.
        RuntimeFailure: torchrun or a worker failed (the message points at ``train.log``).
    """
    if cfg.rdzv_endpoint:
        check_rendezvous(cfg.rdzv_endpoint, cfg.rdzv_timeout_s)
    for path in run.file("errors").glob("rank-*.txt"):
        path.unlink()
    log = run.file("train.log")
    log_start = log.stat().st_size if log.is_file() else 0
    # PYTHONSAFEPATH keeps the current directory off the workers' sys.path. Sharing torchrun's rendezvous
    # store with the process group hands restarted workers the dead group's addresses (pytorch#135712).
    env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    # A multi-node job's workers learn their node rank from the rendezvous; they tell this process in node_file.
    args = [str(run.path), node_file(run).stem] if cfg.rdzv_endpoint else [str(run.path)]
    cmd = torchrun_command(cfg, module, args)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        previous = _terminate_as_interrupt()
        try:
            while proc.poll() is None:
                time.sleep(0.3)
                if on_progress is not None:
                    on_progress(run)
        except BaseException:
            _stop(proc)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    if on_progress is not None:
        on_progress(run)
    if proc.returncode != 0:
        err = _first_error(run)
        if err is not None:
            raise err
        with open(log, "rb") as f:
            f.seek(log_start)
            text = f.read().decode("utf-8", errors="replace")
        raise RuntimeFailure(f"training failed (torchrun exit code {proc.returncode}): {_log_reason(text, cfg)}; see {log}")


def _terminate_as_interrupt() -> Any:
    """While we wait on torchrun, SIGTERM (a scheduler stopping us) unwinds like Ctrl-C so the job is stopped.

    Returns the previous handler, or None when not on the main thread (signals cannot be set there).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM torchrun (it stops its workers), SIGKILL after a grace period, and SIGKILL any worker left.

    torchrun starts each worker in its own session, so killing torchrun's process group misses them.
    """
    workers = _children(proc.pid)
    for sig, wait_s in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
