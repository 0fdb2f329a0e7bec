"""Start, watch and stop Flower's Deployment Engine processes: one SuperLink and its SuperNodes.

Standard library only. Every daemon starts in its own session (``start_new_session``) with its PID and
process group recorded, is told to die with this process (Linux ``PR_SET_PDEATHSIG``), and
:meth:`Federation.stop` ends each group and every descendant (the SuperLink and SuperNodes start
``flower-superexec`` detached, which starts ``flwr-serverapp`` / ``flwr-clientapp``). Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from fedge.errors import ConfigError, RuntimeFailure
from fedge.rundir import atomic_write_text

__all__ = ["Daemon", "Federation", "TlsFiles", "free_port", "kill_recorded", "processes_under", "sigterm_as_interrupt", "wait_for_port"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1
_NODE_ID = re.compile(rb"SuperNode ID: (\d+)")  # what flower-supernode logs once the SuperLink activated it


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
            raise RuntimeFailure(f"process {alive.args[0] if isinstance(alive.args, list) else alive.args} exited "
                                 f"with code {alive.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(_POLL_S)
    raise RuntimeFailure(f"nothing listened on {host}:{port} within {timeout_s:.0f} s")


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM it when the parent dies, so a killed supervisor
    # leaves no daemons behind.
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_under(home: Path) -> list[int]:
    """Live processes whose ``FLWR_HOME`` lies under ``home``: every daemon a Federation starts and all their
    descendants inherit one, even those whose parent already died (Linux /proc; empty elsewhere)."""
    prefix = (str(home).rstrip("/") + "/").encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"FLWR_HOME=" + prefix) for e in environ) and _alive(int(entry)):
            found.append(int(entry))
    return found


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _prctl(option: int, value: int) -> int:
    if not sys.platform.startswith("linux"):
        return -1
    import ctypes

    try:
        return int(ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0))
    except OSError:
        return -1


def _reap(pids: Sequence[int], *, timeout_s: float) -> None:
    # Descendants orphaned by a killed parent are re-parented to us (we are a child subreaper while a
    # Federation runs); collect their exit status so no zombie is left behind.
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
    # Zombies of Flower processes re-parented to us (a subreaper) after their parent was killed.
    me = os.getpid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                head, _, tail = f.read().rpartition(")")
        except OSError:
            continue
        fields = tail.split()
        name = head.partition("(")[2]
        if len(fields) > 1 and fields[0] == "Z" and int(fields[1]) == me and name.startswith(("flwr", "flower")):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


def _logged_node_id(log: Path) -> int | None:
    # The node id flower-supernode logged on its last activation, or None (it never joined).
    try:
        found = _NODE_ID.findall(log.read_bytes())
    except OSError:
        return None
    return int(found[-1]) if found else None


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
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(_POLL_S)
    # Descendants may have started meanwhile (a ClientApp launched during shutdown).
    pids = list(dict.fromkeys([*pids, *(d for r in roots for d in descendants(r))]))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _signal_all([p for p in pids if _alive(p)], signal.SIGKILL)
    deadline = time.monotonic() + 2.0  # let the kills land, so orphans are re-parented before anyone reaps
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(_POLL_S / 2)
    return [p for p in pids if p not in roots]


def kill_recorded(pids_file: Path) -> int:
    """Stop processes a previous (killed) supervisor recorded in ``pids.json`` if they still run Flower.

    Returns:
        How many were still running.
    """
    try:
        recorded = json.loads(pids_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return 0
    live = [
        int(p["pid"])
        for p in recorded
        if _alive(int(p["pid"])) and any(s in _cmdline(int(p["pid"])) for s in ("flower-", "fedge.plugins.fl.worker"))
    ]
    live += [p for p in processes_under(pids_file.parent) if p not in live]
    if live:
        terminate_tree(live)
    return len(live)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt, so a job runner's stop cleans up like Ctrl-C."""
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


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Certificates for a TLS SuperLink: the CA the nodes trust, and the server's certificate and key."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


@dataclass
class Daemon:
    """One started process: its name, Popen handle and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Federation:
    """A SuperLink and its SuperNodes as child processes, with a private ``FLWR_HOME`` under ``workdir``.

    Args:
        workdir: logs go to ``workdir/logs``, Flower's state to ``workdir/flwr``.
        tls: certificates; None means plaintext (``--insecure``), allowed only on loopback.
        auth: SuperNode authentication (needs ``tls``).
        host: address the SuperLink binds.
        env: extra environment for every process.
    """

    workdir: Path
    tls: TlsFiles | None = None
    auth: bool = False
    host: str = "127.0.0.1"
    env: Mapping[str, str] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)
    fleet_port: int = 0
    control_port: int = 0
    worker_sockets: list[str] = field(default_factory=list)
    _socket_dir: Path | None = None

    def __post_init__(self) -> None:
        # Become a child subreaper (Linux) so orphaned Flower processes are ours to reap at stop().
        _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
        self.workdir = Path(self.workdir).resolve()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        if self.auth and self.tls is None:
            raise ConfigError("SuperNode authentication needs TLS; pass --tls (or certificates) with --auth")

    # -- environment ---------------------------------------------------------------------------------
    @staticmethod
    def bin_dir() -> Path:
        """The directory holding flower-superlink (the venv's bin), which must be on PATH for the daemons."""
        here = Path(sys.executable).parent
        if (here / "flower-superlink").exists():
            return here
        found = shutil.which("flower-superlink")
        if found is None:
            raise ConfigError("flower-superlink not found; install Flower with: pip install 'fedge[flower]'")
        return Path(found).parent

    def environ(self, home: str = "flwr") -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PATH": f"{self.bin_dir()}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_HOME": str(self.workdir / home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                # The SuperExec polls for new tasks every second by default; each poll is a cheap HTTP call.
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONSAFEPATH": "1",
                # Several clients share few cores: one thread each avoids oversubscription.
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            }
        )
        env.update(self.env)
        return env

    def _start(self, name: str, argv: list[str], *, home: str = "flwr") -> Daemon:
        log = self.workdir / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.environ(home),
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
            )
        daemon = Daemon(name, proc, log)
        self.daemons.append(daemon)
        self._record_pids()
        return daemon

    def _record_pids(self) -> None:
        atomic_write_text(
            self.workdir / "pids.json",
            json.dumps([{"name": d.name, "pid": d.proc.pid} for d in self.daemons], indent=2) + "\n",
        )

    def _tls_client_args(self) -> list[str]:
        return ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca_cert)]

    @property
    def fleet_address(self) -> str:
        return f"{self.host}:{self.fleet_port}"

    @property
    def control_address(self) -> str:
        # The Control API is served on the SuperLink's HTTP host/port; clients on this machine use loopback.
        host = "127.0.0.1" if self.host in ("0.0.0.0", "127.0.0.1") else self.host
        return f"{host}:{self.control_port}"

    # -- SuperLink -----------------------------------------------------------------------------------
    def start_superlink(self, *, fleet_port: int = 0, control_port: int = 0, timeout_s: float = 60.0) -> Daemon:
        """Start ``flower-superlink`` (gRPC-rere Fleet API) and wait until both its ports listen."""
        self.fleet_port = fleet_port or free_port()
        self.control_port = control_port or free_port()
        argv = [
            str(self.bin_dir() / "flower-superlink"),
            "--fleet-api-type", "grpc-rere",
            "--fleet-api-address", f"{self.host}:{self.fleet_port}",
            "--host", self.host,
            "--port", str(self.control_port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if self.tls is None:
            argv.append("--insecure")
        else:
            if self.tls.server_cert is None or self.tls.server_key is None:
                raise ConfigError("a TLS SuperLink needs a server certificate and key; create them with: fedge fl certs")
            argv += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                     "--ssl-keyfile", str(self.tls.server_key)]  # fmt: skip
        if self.auth:
            argv.append("--enable-supernode-auth")
        daemon = self._start("superlink", argv)
        probe = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        wait_for_port(probe, self.fleet_port, timeout_s=timeout_s, alive=daemon.proc)
        wait_for_port(probe, self.control_port, timeout_s=timeout_s, alive=daemon.proc)
        self._write_cli_config()
        return daemon

    def _write_cli_config(self) -> None:
        # The `flwr` CLI reads its SuperLink connections from $FLWR_HOME/config.toml.
        lines = ["[superlink]", 'default = "fedge"', "", "[superlink.fedge]", f'address = "{self.control_address}"']
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls.ca_cert}"')
        home = self.workdir / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")

    def flwr_cli(self, args: list[str], *, timeout_s: float = 120.0) -> str:
        """Run the ``flwr`` CLI against this SuperLink; returns stdout.

        Raises:
            RuntimeFailure: non-zero exit or timeout (the message carries the CLI's last output line).
        """
        argv = [str(self.bin_dir() / "flwr"), *args]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, env=self.environ(), cwd=self.workdir, timeout=timeout_s,
                start_new_session=True, check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeFailure(f"`flwr {args[0]}` did not finish within {timeout_s:.0f} s") from err
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise RuntimeFailure(f"`flwr {' '.join(args[:2])}` failed (exit {done.returncode}): {tail[0]}")
        return done.stdout

    def register_node(self, public_key: Path) -> None:
        """Register a SuperNode's public key so it may join (``--enable-supernode-auth``)."""
        self.flwr_cli(["supernode", "register", str(public_key), "fedge"])

    def submit(self, app_dir: Path, run_config: Mapping[str, str | int | float | bool]) -> int:
        """Submit the Flower App in ``app_dir`` as a new run (``flwr run``); returns the run id."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        out = self.flwr_cli(["run", str(app_dir), "fedge", "--run-config", overrides, "--format", "json"])
        try:
            payload = json.loads(out[out.index("{") :])
            return int(payload["run-id"])
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeFailure(f"`flwr run` gave no run id; it printed: {out.strip()[-200:]}") from err

    # -- SuperNodes ----------------------------------------------------------------------------------
    def start_supernode(
        self, index: int, *, node_config: Mapping[str, str | int | float], auth_key: Path | None = None
    ) -> Daemon:
        """Start ``flower-supernode`` number ``index`` with its own runtime port and node config."""
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        argv = [
            str(self.bin_dir() / "flower-supernode"),
            "--superlink", f"{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.fleet_port}",
            "--port", str(free_port()),
            "--node-config", config,
            *self._tls_client_args(),
        ]  # fmt: skip
        if auth_key is not None:
            argv += ["--auth-supernode-private-key", str(auth_key)]
        return self._start(f"supernode-{index}", argv, home=f"flwr-node-{index}")

    def unregister_supernode(self, daemon: Daemon) -> int | None:
        """Unregister a SuperNode we started whose process has exited (``flwr supernode unregister``).

        The SuperLink then stops listing it and answers messages to it with ``NODE_UNAVAILABLE`` at once;
        otherwise it keeps the node online until 2 missed 30 s heartbeats (36-60 s after a kill).

        Returns:
            The unregistered node id, or None when the node never logged one (it never joined).

        Raises:
            RuntimeFailure: the ``flwr`` CLI failed.
        """
        node_id = _logged_node_id(daemon.log)
        if node_id is not None:
            self.flwr_cli(["supernode", "unregister", str(node_id), "fedge"], timeout_s=30.0)
        return node_id

    def start_worker(self, index: int) -> str:
        """Start SuperNode ``index``'s warm training worker (:mod:`fedge.plugins.fl.worker`); returns its socket."""
        from fedge.plugins.fl.worker import make_key

        if self._socket_dir is None:
            # Unix socket paths are limited to ~100 bytes, so they live in a short temporary directory.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="fedge-"))
        path = self._socket_dir / f"w{index}.sock"
        make_key(path)
        self._start(f"worker-{index}", [sys.executable, "-m", "fedge.plugins.fl.worker", str(path)])
        self.worker_sockets.append(str(path))
        return str(path)

    # -- watching and stopping -----------------------------------------------------------------------
    def dead(self) -> list[Daemon]:
        """Daemons that have exited."""
        return [d for d in self.daemons if d.proc.poll() is not None]

    def find(self, pattern: str) -> list[int]:
        """PIDs of descendants of our daemons whose command line contains ``pattern`` (e.g. flwr-serverapp)."""
        return [p for d in self.daemons for p in descendants(d.proc.pid) if pattern in _cmdline(p)]

    def stop(self, *, grace_s: float = 5.0) -> None:
        """Stop every daemon, its process group and all descendants; idempotent."""
        roots = [d.proc.pid for d in self.daemons]
        strays = [p for p in processes_under(self.workdir) if p not in roots]  # e.g. orphaned SuperExecs
        others = terminate_tree(roots + strays, grace_s=grace_s) if roots or strays else []
        others += strays
        for d in self.daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.proc.wait(timeout=grace_s)
        _reap(others, timeout_s=grace_s)
        _reap_orphans(exclude=roots)
        _prctl(36, 0)
        self.daemons.clear()
        with contextlib.suppress(OSError):
            (self.workdir / "pids.json").unlink()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
