"""``fedge.plugins.fl.run``: a whole federated run, on Flower's Deployment Engine.

:class:`LocalFederation` writes each client's data, starts a SuperLink and one SuperNode (and warm worker)
per client on free loopback ports; :class:`RemoteFederation` starts only the SuperLink and serves SuperNodes
that run elsewhere (``fedge fl superlink``). Both then submit the app with ``flwr run``, follow
``metrics.jsonl`` while the ServerApp trains, and stop every process they started, also on Ctrl-C and on
failure. Example::

    from fedge.plugins.fl import FlConfig, run

    result = run(FlConfig(clients=4, rounds=5), out="runs/fl-demo")
    print(result.accuracy, result.run_dir)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.config import to_mapping
from fedge.errors import ConfigError, Interrupted, RuntimeFailure
from fedge.failure import read_failure
from fedge.plugins.fl.config import FlConfig, load_config
from fedge.plugins.fl.federation import Daemon, Federation, TlsFiles, kill_recorded_federation
from fedge.plugins.fl.server_app import FAILURE_FILE, STATUS_FILE
from fedge.rundir import RunDir, atomic_path
from fedge.supervisor import sigterm_as_interrupt

if TYPE_CHECKING:
    import numpy as np

    from fedge.plugins.data import ArrayDataset

__all__ = ["LocalFederation", "RemoteFederation", "RemoteNodes", "RunResult", "prepare_data", "run", "write_app"]

logger = logging.getLogger(__name__)

APP_PYPROJECT = """\
# fedge's Flower App: its components live in the installed fedge package, so the FAB holds only this file.
[project]
name = "fedge-fl"
version = "1.0.0"
description = "fedge federated training (ServerApp + ClientApp)"
license = "Apache-2.0"
dependencies = ["flwr>=1.39,<1.40"]

[tool.flwr.app]
publisher = "fedge"

[tool.flwr.app.components]
serverapp = "fedge.plugins.fl.server_app:app"
clientapp = "fedge.plugins.fl.client_app:app"

[tool.flwr.app.config]
run-dir = ""
"""

_POLL_S = 0.25
Split = tuple["ArrayDataset", list["np.ndarray"]]


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a federated run produced."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    accuracy: float
    loss: float
    wall_s: float
    rejected: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "rounds": len(self.metrics),
            "accuracy": self.accuracy,
            "loss": self.loss,
            "wall_s": round(self.wall_s, 2),
            "rejected": self.rejected,
            "metrics": self.metrics,
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class RemoteNodes:
    """Serve SuperNodes that run elsewhere (``fedge fl superlink``) instead of starting local ones."""

    host: str = "0.0.0.0"
    """Address the SuperLink binds."""
    fleet_port: int = 9092
    """Fleet API (gRPC) port the SuperNodes connect to."""
    control_port: int = 9093
    """Control/Runtime HTTP API port (``flwr`` CLI and the ServerApp)."""
    tls: TlsFiles | None = None
    """CA, server certificate and key; None only with an explicit ``--insecure``."""
    auth_keys: tuple[Path, ...] = ()
    """Public keys (OpenSSH) of the SuperNodes allowed to join; non-empty enables SuperNode authentication."""


def write_app(directory: Path) -> Path:
    """Write fedge's Flower App (a ``pyproject.toml`` naming the ServerApp and ClientApp) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    return directory


def _client_files(run: RunDir, cfg: FlConfig) -> list[Path]:
    return [run.file("data") / f"client-{i}.npz" for i in range(cfg.clients)]


def load_and_split(cfg: FlConfig, *, num_clients: int) -> Split:
    """The dataset and one index array per client (none for ``num_clients=0``: remote nodes bring their data)."""
    from fedge.plugins.data import load_dataset, partition

    dataset = load_dataset(cfg.dataset, cfg.dataset_options)
    parts = partition(dataset.y_train, num_clients, cfg.partition_config) if num_clients else []
    return dataset, parts


def _savez(path: Path, **arrays: Any) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a full disk leaves no half-written file
        np.savez(f, **arrays)


def write_data(
    run: RunDir, cfg: FlConfig, dataset: ArrayDataset, parts: list[np.ndarray], *, client_files: bool = True
) -> list[Path]:
    """Write each client's share (``data/client-<i>.npz``, unless ``client_files`` is false: virtual clients
    take theirs from the dataset), the held-out set and ``partitions.json``."""
    from fedge.plugins.data import partition_stats

    files = _client_files(run, cfg) if parts and client_files else []
    for path, idx in zip(files, parts if files else [], strict=True):
        _savez(path, x_train=dataset.x_train[idx], y_train=dataset.y_train[idx])
    _savez(run.file("data") / "test.npz", x_test=dataset.x_test, y_test=dataset.y_test, num_classes=dataset.num_classes)
    if parts:
        stats = partition_stats(dataset.y_train, parts, dataset.num_classes)
        run.write_json(
            "partitions.json",
            {"dataset": cfg.dataset, "partition": cfg.partition, "clients": [s.to_json() for s in stats]},
        )
    return files


def prepare_data(run: RunDir, cfg: FlConfig) -> list[Path]:
    """The clients' data files, split now unless the run directory holds them (a resumed run keeps its split)."""
    files = _client_files(run, cfg)
    if all(f.is_file() for f in files) and (run.file("data") / "test.npz").is_file():
        return files
    return write_data(run, cfg, *load_and_split(cfg, num_clients=cfg.clients))


class _Federated:
    """What both kinds of federation share: the app, the SuperLink, submitting, following, stopping.

    Args:
        run: the run directory (created or reopened by :func:`run`).
        cfg: the run settings.
        split: the dataset already read and split (a new run), or None (a resumed one reads its own files).
        on_round: called with each ``metrics.jsonl`` record as it appears.
        on_status: called with short status lines.
    """

    where = "local"

    def __init__(
        self,
        run: RunDir,
        cfg: FlConfig,
        *,
        split: Split | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.run, self.cfg, self.split = run, cfg, split
        self.on_round = on_round or (lambda record: None)
        self.status = on_status or (lambda line: logger.info("%s", line))
        self.seen = len(run.read_metrics())

    def execute(self) -> dict[str, Any]:
        """Start the processes, run the app to its end, stop everything; returns ``result.json``."""
        app_dir = write_app(self.run.file("app"))
        files = self.prepare()
        self.status(f"run directory {self.run.path}; starting the SuperLink and SuperNodes")
        with sigterm_as_interrupt(), self.federation() as fed:
            self.start(fed, files)
            self.status(
                f"SuperLink on {fed.fleet_address} (gRPC Fleet API), {self.cfg.clients} {self.where} SuperNodes; "
                f"logs in {fed.workdir / 'logs'}"
            )
            run_id = fed.submit(app_dir, {"run-dir": str(self.run.path)})
            self.status(f"submitted Flower run {run_id}")
            return self.follow(fed)

    def prepare(self) -> list[Path]:
        raise NotImplementedError

    def federation(self) -> Federation:
        raise NotImplementedError

    def start(self, fed: Federation, files: list[Path]) -> None:
        raise NotImplementedError

    def follow(self, fed: Federation) -> dict[str, Any]:
        """Report new metrics until the ServerApp writes ``result.json``; fail fast when it cannot finish."""
        watch = _Watch(self.cfg, self.cfg.rounds - self.seen)
        while True:
            self._report_new_rounds()
            if (result := self._result(fed)) is not None:
                return result
            self._check_daemons(fed, watch)
            watch.check(fed, self.run.file(FAILURE_FILE))
            self._report_waiting(watch)
            time.sleep(_POLL_S)

    def _report_new_rounds(self) -> None:
        metrics = self.run.read_metrics()
        for record in metrics[self.seen :]:
            self.on_round(record)
        self.seen = max(self.seen, len(metrics))

    def _result(self, fed: Federation) -> dict[str, Any] | None:
        if (failure := read_failure(self.run.file(FAILURE_FILE))) is not None:
            raise failure.to_error()
        result_file = self.run.file("result.json")
        if not result_file.is_file():
            return None
        return json.loads(result_file.read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def _check_daemons(self, fed: Federation, watch: _Watch) -> None:
        for daemon in fed.dead():
            if daemon.name == "superlink":
                raise RuntimeFailure(f"the SuperLink exited (code {daemon.proc.returncode}); see {daemon.log}")
            if daemon.name not in watch.warned:
                watch.warned.add(daemon.name)
                logger.warning("%s exited (code %s); the run goes on without it", daemon.name, daemon.proc.returncode)
                if daemon.name.startswith("supernode-"):
                    _unregister(fed, daemon)

    def _report_waiting(self, watch: _Watch) -> None:
        # The ServerApp says how many SuperNodes it waits for (server_app.STATUS_FILE).
        try:
            status = json.loads(self.run.file(STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        line = f"waiting for {status['required'] - status['connected']} of {status['required']} SuperNodes"
        if status.get("waiting") and line != watch.last_status:
            watch.last_status = line
            self.status(line)


class _Watch:
    """Deadlines of following a run: the ServerApp must appear, stay, and finish in time."""

    def __init__(self, cfg: FlConfig, remaining: int) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.deadline = self.started + 2 * cfg.startup_timeout_s + max(remaining, 1) * (cfg.round_timeout_s + 60)
        self.server_seen_at: float | None = None
        self.gone_since: float | None = None
        self.warned: set[str] = set()
        self.last_status = ""

    def check(self, fed: Federation, failure_file: Path) -> None:
        now, logs = time.monotonic(), fed.workdir / "logs"
        if fed.find("flwr-serverapp"):
            self.server_seen_at, self.gone_since = now, None
        elif self.server_seen_at is not None:
            self.gone_since = self.gone_since or now
            if now - self.gone_since > 5.0:
                raise RuntimeFailure(f"the ServerApp process ended without a result; see {logs}")
        elif now - self.started > self.cfg.startup_timeout_s:
            raise RuntimeFailure(f"the ServerApp did not start within {self.cfg.startup_timeout_s:.0f} s; see {logs}")
        if now > self.deadline:
            raise RuntimeFailure(f"the run did not finish before its deadline; see {logs}")


class LocalFederation(_Federated):
    """A SuperLink and ``cfg.clients`` SuperNodes (each with its data file and warm worker) on this machine."""

    def prepare(self) -> list[Path]:
        if self.split is not None:
            return write_data(self.run, self.cfg, *self.split)
        return prepare_data(self.run, self.cfg)

    def federation(self) -> Federation:
        return Federation(
            self.run.file("flower"), tls=self._tls_files(), auth=self.cfg.auth, supernode_poll_s=self.cfg.supernode_poll_s
        )

    def start(self, fed: Federation, files: list[Path]) -> None:
        fed.start_superlink(timeout_s=self.cfg.startup_timeout_s)
        keys = self._node_keys() if self.cfg.auth else []
        for _, pub in keys:
            fed.register_node(pub)
        for i, path in enumerate(files):
            node_config: dict[str, str | int | float] = {
                "partition-id": i, "num-partitions": self.cfg.clients, "data-path": str(path.resolve())
            }  # fmt: skip
            if self.cfg.warm_workers:
                node_config["worker"] = fed.start_worker(i)
            if fault := self.cfg.faults.get(str(i)):
                node_config["fault"] = fault
            fed.start_supernode(i, node_config=node_config, auth_key=keys[i][0] if keys else None)
        _wait_for_workers(fed, self.cfg.startup_timeout_s)

    def _tls_files(self) -> TlsFiles | None:
        if not self.cfg.secure:
            return None
        from fedge.plugins.fl.certs import make_certs

        certs = self.run.file("certs")
        if not (certs / "server.pem").is_file():
            make_certs(certs)
        return TlsFiles(ca_cert=certs / "ca.crt", server_cert=certs / "server.pem", server_key=certs / "server.key")

    def _node_keys(self) -> list[tuple[Path, Path]]:
        from fedge.plugins.fl.certs import make_node_keys

        certs = self.run.file("certs")
        pairs = [(certs / f"node-{i}.key", certs / f"node-{i}.pub") for i in range(self.cfg.clients)]
        if not all(k.is_file() and p.is_file() for k, p in pairs):
            pairs = make_node_keys(certs, num_nodes=self.cfg.clients)
        return pairs


class RemoteFederation(_Federated):
    """A SuperLink on ``remote.host`` serving ``cfg.clients`` SuperNodes started elsewhere."""

    where = "remote"

    def __init__(self, run: RunDir, cfg: FlConfig, *, remote: RemoteNodes, **kwargs: Any) -> None:
        super().__init__(run, cfg, **kwargs)
        self.remote = remote

    def prepare(self) -> list[Path]:
        if self.split is not None:
            write_data(self.run, self.cfg, *self.split)  # the held-out set only: the nodes bring their data
        return []

    def federation(self) -> Federation:
        r = self.remote
        return Federation(self.run.file("flower"), tls=r.tls, auth=bool(r.auth_keys), host=r.host)

    def start(self, fed: Federation, files: list[Path]) -> None:
        r = self.remote
        fed.start_superlink(fleet_port=r.fleet_port, control_port=r.control_port, timeout_s=self.cfg.startup_timeout_s)
        for pub in r.auth_keys:
            fed.register_node(pub)


def run(
    config: FlConfig | Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    remote: RemoteNodes | None = None,
) -> RunResult:
    """Run a federation: ``config.clients`` SuperNodes here, or (``remote``) started on other machines.

    Args:
        config: the run settings (defaults: the README's main job).
        out: run directory; default ``runs/fl-<timestamp>``. One that holds a run is refused.
        resume: a run directory of an interrupted run; continues after its last checkpoint (``config`` is
            ignored: the directory's ``config.toml`` is used).
        overwrite: replace the run in ``out`` whole (the old one comes back if this run fails).
        on_round: called with each ``metrics.jsonl`` record as it appears.
        on_status: called with short status lines (processes started, run submitted).
        remote: wait for ``config.clients`` SuperNodes started elsewhere (``fedge fl supernode``).

    Returns:
        The run directory, per-round metrics and the final held-out accuracy/loss.

    Raises:
        ConfigError: invalid settings or an unusable ``out`` / resume directory.
        RuntimeFailure: a process failed to start, the ServerApp failed, or a deadline passed.
        Interrupted: Ctrl-C or SIGTERM (the message says how to resume).
    """
    started = time.monotonic()
    cfg, split = _settings_and_data(config, resume, remote, on_status)
    out = resume if resume is not None else out
    with RunDir.create("fl", out, resume=resume is not None, overwrite=overwrite, resumable=True) as created:
        run_dir = RunDir(created.path.resolve())  # the daemons run in other working directories
        if resume is None:
            run_dir.write_config(to_mapping(cfg))
        else:
            _clear_previous_attempt(run_dir, on_status)
        fed = _federation(run_dir, cfg, remote, split=split, on_round=on_round, on_status=on_status)
        try:
            result = fed.execute()
        except KeyboardInterrupt:
            raise _interrupted(run_dir, cfg) from None
    metrics = run_dir.read_metrics()
    return RunResult(
        run_dir=run_dir.path,
        metrics=metrics,
        accuracy=float(result["accuracy"]),
        loss=float(result["loss"]),
        wall_s=time.monotonic() - started,
        rejected=sum(int(m.get("rejected") or 0) for m in metrics),
        extra={"privacy": result["privacy"]} if "privacy" in result else {},
    )


def _settings_and_data(
    config: FlConfig | Mapping[str, Any] | None,
    resume: str | Path | None,
    remote: RemoteNodes | None,
    on_status: Callable[[str], None] | None,
) -> tuple[FlConfig, Split | None]:
    """The run's settings, checked, and (for a new run) its data read and split, before any directory exists."""
    if resume is not None:
        cfg = _resumed_config(Path(resume))
        check_before_start(cfg)
        return cfg, None  # a resumed run keeps its split
    cfg = config if isinstance(config, FlConfig) else load_config(None, config or {})
    check_before_start(cfg)
    for note in _check_privacy(cfg):
        (on_status or logger.warning)(note)
    # A missing option or file, a malformed file or too many clients fails here and leaves nothing behind.
    return cfg, load_and_split(cfg, num_clients=cfg.clients if remote is None else 0)


def _federation(run_dir: RunDir, cfg: FlConfig, remote: RemoteNodes | None, **kwargs: Any) -> _Federated:
    if remote is not None:
        return RemoteFederation(run_dir, cfg, remote=remote, **kwargs)
    if cfg.engine == "simulation":
        from fedge.plugins.fl.simulation import SimulationFederation

        return SimulationFederation(run_dir, cfg, **kwargs)
    return LocalFederation(run_dir, cfg, **kwargs)


def _resumed_config(path: Path) -> FlConfig:
    if path.is_dir() and not (path / "config.toml").is_file():
        raise ConfigError(f"cannot resume {str(path)!r}: it holds no config.toml; pass a directory made by fedge fl run")
    if not path.is_dir():
        raise ConfigError(f"cannot resume {str(path)!r}: no such directory; pass a directory made by fedge fl run")
    return load_config(path / "config.toml")


def _check_privacy(cfg: FlConfig) -> list[str]:
    """Refuse DP / SecAgg+ settings that cannot work with this aggregator or budget, before anything starts."""
    if not cfg.privacy.enabled:
        return []
    from fedge.plugins.aggregators import Sampling, build_strategy
    from fedge.plugins.fl.privacy import check_privacy

    strategy = build_strategy(cfg.aggregator, cfg.aggregator_options, Sampling(fraction_train=cfg.fraction_train))
    notes: list[str] = check_privacy(cfg, strategy)
    return notes


def check_before_start(cfg: FlConfig) -> None:
    """Refuse, before anything is written, a run that cannot work (client counts, a missing engine)."""
    from fedge.plugins.aggregators import check_client_count

    check_client_count(cfg.aggregator, cfg.aggregator_options, cfg.num_sampled)
    if cfg.engine == "simulation":
        from fedge.plugins.fl.simulation import check_simulation

        check_simulation(cfg.ray_address, client_cpus=cfg.client_cpus, client_gpus=cfg.client_gpus)
    else:
        from fedge.plugins.fl.flower_internals import check_supernode_poll

        check_supernode_poll()  # a changed Flower: one line before the run directory exists


def _clear_previous_attempt(run_dir: RunDir, on_status: Callable[[str], None] | None) -> None:
    leftovers = kill_recorded_federation(run_dir.file("flower"))
    if leftovers and on_status is not None:
        on_status(f"stopped {leftovers} process(es) left by the interrupted run")
    for name in ("result.json", FAILURE_FILE, STATUS_FILE):
        with contextlib.suppress(OSError):
            run_dir.file(name).unlink()


def _interrupted(run_dir: RunDir, cfg: FlConfig) -> Interrupted:
    done = max((int(m["round"]) for m in run_dir.read_metrics() if "round" in m), default=0)
    if run_dir.replacing:
        return Interrupted(
            f"interrupted after round {done} of {cfg.rounds}; the new run was discarded and the run it was to "
            f"replace is back in {run_dir.path}"
        )
    return Interrupted(
        f"interrupted after round {done} of {cfg.rounds}; kept {run_dir.path}; "
        f"resume with: fedge fl run --resume {run_dir.path}"
    )


def _wait_for_workers(fed: Federation, timeout_s: float) -> None:
    # A worker opens its socket once torch is imported; a round that starts earlier trains in the ClientApp
    # process instead (correct, only slower), so this wait only saves time and never fails the run.
    sockets = [Path(s) for s in fed.worker_sockets]
    deadline = time.monotonic() + timeout_s
    while sockets and not all(s.exists() for s in sockets) and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def _unregister(fed: Federation, daemon: Daemon) -> None:
    # Flower would list a killed SuperNode for up to 60 s more (heartbeat expiry), and rounds would sample it
    # and wait for it; unregistered, it is offline at once. If this fails the round loop's quarantine still
    # stops waiting for it after one missed round (see liveness.py).
    try:
        node_id = fed.unregister_supernode(daemon)
    except RuntimeFailure as err:
        logger.warning("could not unregister %s from the SuperLink: %s", daemon.name, err)
        return
    if node_id is not None:
        logger.warning("unregistered %s (node %d) from the SuperLink", daemon.name, node_id)
