"""Start a job under torchrun (``python -m torch.distributed.run``) and watch it until it ends.

fedge does not launch ranks itself: rendezvous, multi-node, ``--nnodes MIN:MAX`` and ``--max-restarts``
are torchrun's. This module builds the torchrun command line, checks what can be checked before any
process starts (strategy name, world size, a reachable rendezvous endpoint), streams progress from the
run directory, and turns a failed job into one line. torchrun's own output goes to ``RUN_DIR/logs/train.log``;
the process tree is the core supervisor's (:mod:`fedge.supervisor`), failures the core failure records.

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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedge.errors import FedgeError, RuntimeFailure
from fedge.failure import read_failure
from fedge.plugins.train.config import TrainConfig, parse_nnodes
from fedge.rundir import RunDir
from fedge.supervisor import Supervisor, sigterm_as_interrupt

__all__ = ["check_rendezvous", "launch", "log_file", "node_file", "torchrun_command"]

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
    """The failure the ranks recorded that explains most: a user error before its fallout in other ranks."""
    found = [f for path in sorted(run.file("errors").glob("rank-*.json")) if (f := read_failure(path)) is not None]
    if not found:
        return None
    return min(found, key=lambda f: f.exit_code != 1).to_error()


def _log_reason(text: str, cfg: TrainConfig) -> str:
    """Why torchrun failed, from its output in ``logs/train.log`` (this launch's part)."""
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
    module: str = "fedge.plugins.train.trainer",
    on_progress: Callable[[RunDir], None] | None = None,
) -> None:
    """Run ``module`` under torchrun for ``cfg`` with ``run`` as its run directory; return when it succeeds.

    Ctrl-C or SIGTERM stops torchrun and every worker, then propagates as KeyboardInterrupt.

    Raises:
        ConfigError: a worker reported a user error.
        RuntimeFailure: torchrun or a worker failed (the message points at ``logs/train.log``).
    """
    if cfg.rdzv_endpoint:
        check_rendezvous(cfg.rdzv_endpoint, cfg.rdzv_timeout_s)
    for path in run.file("errors").glob("rank-*.json"):
        path.unlink()
    log = log_file(run)
    log_start = log.stat().st_size if log.is_file() else 0
    # PYTHONSAFEPATH keeps the current directory off the workers' sys.path. Sharing torchrun's rendezvous
    # store with the process group hands restarted workers the dead group's addresses (pytorch#135712).
    env = {"PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    # A multi-node job's workers learn their node rank from the rendezvous; they tell this process in node_file.
    args = [str(run.path.resolve()), node_file(run).stem] if cfg.rdzv_endpoint else [str(run.path.resolve())]
    with Supervisor(run.path) as supervisor, sigterm_as_interrupt():
        proc = supervisor.start("train", torchrun_command(cfg, module, args), env=env, cwd=Path.cwd()).proc
        try:
            while proc.poll() is None:
                time.sleep(0.3)
                if on_progress is not None:
                    on_progress(run)
        except BaseException:
            supervisor.stop(grace_s=_STOP_GRACE_S)  # torchrun stops its workers on SIGTERM; the rest is killed
            raise
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


def log_file(run: RunDir) -> Path:
    """torchrun's and the workers' output."""
    return run.file("logs") / "train.log"
