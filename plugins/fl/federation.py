"""Start, watch and stop Flower's Deployment Engine processes: one SuperLink, its SuperNodes and warm workers.

Process supervision is the core's (:mod:`fedge.supervisor`): every daemon starts in its own session with its
PID recorded, dies with this process, and :meth:`Federation.stop` ends each process group and every
descendant (the SuperLink and SuperNodes start ``flower-superexec`` detached, which starts ``flwr-serverapp`` /
``flwr-clientapp``); the environment mark ``FEDGE_FEDERATION=<workdir>`` finds those re-parented away. This
module adds what is Flower's: the daemons' command lines, the ``flwr`` CLI, and reading their logs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from fedge.errors import ConfigError, RuntimeFailure
from fedge.plugins.fl.flower_internals import DEFAULT_POLL_S
from fedge.rundir import atomic_write_text
from fedge.supervisor import Child, Supervisor, free_port, kill_recorded, wait_for_port

__all__ = ["FEDERATION_MARK", "Daemon", "Federation", "TlsFiles", "check_port_free", "kill_recorded_federation", "log_cause"]

logger = logging.getLogger(__name__)

FEDERATION_MARK = "FEDGE_FEDERATION"
"""Environment variable every process of a federation inherits: the federation's work directory."""
Daemon = Child  # a started Flower process: name, Popen handle, log file
_NODE_ID = re.compile(rb"SuperNode ID: (\d+)")  # what flower-supernode logs once the SuperLink activated it
_LOG_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exit|Exception): (.+)$")
_LOG_ERROR = re.compile(r"(?:ERROR|CRITICAL)\s*:?\s*(.+)$")
_RECORDED = ("flower-", "fedge.plugins.fl.warm_worker")


def log_cause(log: Path) -> str | None:
    """Why a Flower daemon stopped, from its log (e.g. "Port in server address ... is already in use."), or None.

    The last exception line (``SystemExit: ...``, ``ValueError: ...``) is the cause; Flower's own ERROR lines
    come after it and often say only "Application startup failed", so they are the fallback.
    """
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for pattern in (_LOG_EXCEPTION, _LOG_ERROR):
        for line in reversed(lines):
            if (m := pattern.search(line)) is not None and m.group(1).strip():
                return m.group(1).strip()
    return None


def _logged_node_id(log: Path) -> int | None:
    # The node id flower-supernode logged on its last activation, or None (it never joined).
    try:
        found = _NODE_ID.findall(log.read_bytes())
    except OSError:
        return None
    return int(found[-1]) if found else None


def kill_recorded_federation(workdir: Path) -> int:
    """Stop what a killed ``fedge fl run`` left running in ``workdir`` (recorded PIDs, and marked strays)."""
    from fedge.supervisor import processes_with_env, terminate_tree

    count = kill_recorded(workdir / "pids.json", patterns=_RECORDED)
    strays = processes_with_env(FEDERATION_MARK, str(Path(workdir).resolve()))
    if strays:
        terminate_tree(strays)
    return count + len(strays)


def check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse a port something already listens on (the SuperLink would fail on it only after seconds).

    Raises:
        ConfigError: the port is taken, or ``host`` is not an address of this machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use; stop what holds it or choose another {flag}") from None
            raise ConfigError(f"cannot bind {host}:{port} ({err.strerror}); give --host an address of this machine") from None


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Certificates for a TLS SuperLink: the CA the nodes trust, and the server's certificate and key."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


@dataclass
class Federation:
    """A SuperLink and its SuperNodes as child processes, with a private ``FLWR_HOME`` under ``workdir``.

    Args:
        workdir: logs go to ``workdir/logs``, Flower's state to ``workdir/flwr``.
        tls: certificates; None means plaintext (``--insecure``), allowed only on loopback.
        auth: SuperNode authentication (needs ``tls``).
        host: address the SuperLink binds.
        env: extra environment for every process.
        supernode_poll_s: how often an idle SuperNode asks the SuperLink for a message (Flower's own: 3 s;
            :mod:`.flower_internals`).
    """

    workdir: Path
    tls: TlsFiles | None = None
    auth: bool = False
    host: str = "127.0.0.1"
    env: Mapping[str, str] = field(default_factory=dict)
    fleet_port: int = 0
    control_port: int = 0
    supernode_poll_s: float = DEFAULT_POLL_S
    worker_sockets: list[str] = field(default_factory=list)
    _socket_dir: Path | None = None
    supervisor: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        if self.auth and self.tls is None:
            raise ConfigError("SuperNode authentication needs TLS; pass --tls (or certificates) with --auth")
        self.workdir = Path(self.workdir).resolve()
        self.supervisor = Supervisor(self.workdir, mark=(FEDERATION_MARK, str(self.workdir)))

    @property
    def daemons(self) -> list[Daemon]:
        """The processes started so far."""
        return self.supervisor.children

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
        env = self.supervisor.environ()
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
        return self.supervisor.start(name, argv, env=self.environ(home))

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
        for flag, port in (("--fleet-port", self.fleet_port), ("--control-port", self.control_port)):
            check_port_free(self.host, port, flag)
        daemon = self._start("superlink", argv)
        probe = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        try:
            wait_for_port(probe, self.fleet_port, timeout_s=timeout_s, alive=daemon.proc)
            wait_for_port(probe, self.control_port, timeout_s=timeout_s, alive=daemon.proc)
        except RuntimeFailure as err:
            cause = log_cause(daemon.log)
            raise RuntimeFailure(f"the SuperLink did not start: {cause or err}; see {daemon.log}") from err
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
        from fedge.plugins.fl.flower_internals import check_supernode_poll, supernode_argv

        check_supernode_poll()  # here, in one line, rather than in each SuperNode's log
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        args = [
            "--superlink", f"{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.fleet_port}",
            "--port", str(free_port()),
            "--node-config", config,
            *self._tls_client_args(),
        ]  # fmt: skip
        if auth_key is not None:
            args += ["--auth-supernode-private-key", str(auth_key)]
        argv = supernode_argv(args, poll_s=self.supernode_poll_s)
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
        """Start SuperNode ``index``'s warm training worker (:mod:`fedge.plugins.fl.warm_worker`); returns its socket."""
        from fedge.plugins.fl.warm_worker import make_key

        if self._socket_dir is None:
            # Unix socket paths are limited to ~100 bytes, so they live in a short temporary directory.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="fedge-"))
        path = self._socket_dir / f"w{index}.sock"
        make_key(path)
        self._start(f"worker-{index}", [sys.executable, "-m", "fedge.plugins.fl.warm_worker", str(path)])
        self.worker_sockets.append(str(path))
        return str(path)

    # -- watching and stopping -----------------------------------------------------------------------
    def dead(self) -> list[Daemon]:
        """Daemons that have exited."""
        return self.supervisor.dead()

    def find(self, pattern: str) -> list[int]:
        """PIDs of descendants of our daemons whose command line contains ``pattern`` (e.g. flwr-serverapp)."""
        return self.supervisor.find(pattern)

    def stop(self, *, grace_s: float = 5.0) -> None:
        """Stop every daemon, its process group and all descendants; idempotent."""
        self.supervisor.stop(grace_s=grace_s)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
