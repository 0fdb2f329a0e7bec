"""``fedge.plugins.fl.run``: a whole federated run on this machine, on Flower's Deployment Engine.

It writes the run directory (config, per-client data and partition stats, the Flower App), starts a
SuperLink and one SuperNode per client on free loopback ports, submits the app with ``flwr run``, follows
``metrics.jsonl`` while the ServerApp trains, and stops every process it started, also on Ctrl-C and on
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
from fedge.errors import ConfigError, RuntimeFailure
from fedge.plugins.fl.config import FlConfig, load_config
from fedge.plugins.fl.federation import Daemon, Federation, TlsFiles, kill_recorded, sigterm_as_interrupt
from fedge.rundir import RunDir

if TYPE_CHECKING:
    import numpy as np

    from fedge.plugins.data import ArrayDataset

__all__ = ["RemoteNodes", "RunResult", "prepare_data", "run", "write_app"]

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


def prepare_data(run: RunDir, cfg: FlConfig) -> list[Path]:
    """Split the dataset: ``data/client-<i>.npz`` per client, ``data/test.npz``, and ``partitions.json``."""
    files = _client_files(run, cfg)
    if all(f.is_file() for f in files) and (run.file("data") / "test.npz").is_file():
        return files  # a resumed run keeps its split
    return _write_data(run, cfg, *_load_and_split(cfg, num_clients=cfg.clients))


def _client_files(run: RunDir, cfg: FlConfig) -> list[Path]:
    return [run.file("data") / f"client-{i}.npz" for i in range(cfg.clients)]


def _load_and_split(cfg: FlConfig, *, num_clients: int) -> tuple[ArrayDataset, list[np.ndarray]]:
    """The dataset and one index array per client (none for ``num_clients=0``: remote nodes bring their data)."""
    from fedge.plugins.data import load_dataset, partition

    dataset = load_dataset(cfg.dataset, cfg.dataset_options)
    parts = partition(dataset.y_train, num_clients, cfg.partition_config) if num_clients else []
    return dataset, parts


def _write_data(run: RunDir, cfg: FlConfig, dataset: ArrayDataset, parts: list[np.ndarray]) -> list[Path]:
    """Write each client's share and the held-out set (the ServerApp evaluates on ``data/test.npz``)."""
    import numpy as np

    from fedge.plugins.data import partition_stats

    data_dir = run.file("data")
    data_dir.mkdir(parents=True, exist_ok=True)
    files = _client_files(run, cfg) if parts else []
    for path, idx in zip(files, parts, strict=True):
        np.savez(path, x_train=dataset.x_train[idx], y_train=dataset.y_train[idx])
    np.savez(data_dir / "test.npz", x_test=dataset.x_test, y_test=dataset.y_test, num_classes=dataset.num_classes)
    if parts:
        stats = partition_stats(dataset.y_train, parts, dataset.num_classes)
        run.write_json(
            "partitions.json",
            {"dataset": cfg.dataset, "partition": cfg.partition, "clients": [s.to_json() for s in stats]},
        )
    return files


def _tls_files(run: RunDir, cfg: FlConfig) -> TlsFiles | None:
    if not cfg.secure:
        return None
    from fedge.plugins.fl.certs import make_certs

    certs = run.file("certs")
    if not (certs / "server.pem").is_file():
        make_certs(certs)
    return TlsFiles(ca_cert=certs / "ca.crt", server_cert=certs / "server.pem", server_key=certs / "server.key")


def _node_keys(run: RunDir, cfg: FlConfig) -> list[tuple[Path, Path]]:
    from fedge.plugins.fl.certs import make_node_keys

    certs = run.file("certs")
    pairs = [(certs / f"node-{i}.key", certs / f"node-{i}.pub") for i in range(cfg.clients)]
    if not all(k.is_file() and p.is_file() for k, p in pairs):
        pairs = make_node_keys(certs, num_nodes=cfg.clients)
    return pairs


def run(
    config: FlConfig | Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    remote: RemoteNodes | None = None,
) -> RunResult:
    """Run a federation of ``config.clients`` SuperNodes and one SuperLink on this machine.

    Args:
        config: the run settings (defaults: the README's main job).
        out: run directory; default ``runs/fl-<timestamp>``.
        resume: a run directory of an interrupted run; continues after its last checkpoint (``config`` is
            ignored: the directory's ``config.toml`` is used).
        on_round: called with each ``metrics.jsonl`` record as it appears.
        on_status: called with short status lines (processes started, run submitted).
        remote: wait for ``config.clients`` SuperNodes started on other machines (``fedge fl supernode``)
            instead of starting them here.

    Returns:
        The run directory, per-round metrics and the final held-out accuracy/loss.

    Raises:
        ConfigError: invalid settings or an unusable resume directory.
        RuntimeFailure: a process failed to start, the ServerApp failed, or a deadline passed.
    """
    started = time.monotonic()
    status = on_status or (lambda line: logger.info("%s", line))
    split: tuple[ArrayDataset, list[np.ndarray]] | None = None
    if resume is not None:
        if not (Path(resume) / "config.toml").is_file():
            raise ConfigError(f"cannot resume {str(resume)!r}: no config.toml there; pass a directory made by fedge fl run")
        run_dir = RunDir(resume)
        cfg = load_config(run_dir.file("config.toml"))
        leftovers = kill_recorded(run_dir.file("flower") / "pids.json")
        if leftovers:
            status(f"stopped {leftovers} process(es) left by the interrupted run")
        with contextlib.suppress(OSError):
            run_dir.file("result.json").unlink()
    else:
        if isinstance(config, FlConfig):
            cfg = config
        else:
            cfg = load_config(None, config or {})
        for note in _check_privacy(cfg):
            status(note)
        # Read and split the data before the run directory exists: a missing option or file, a malformed
        # file or too many clients fails here and leaves nothing behind.
        split = _load_and_split(cfg, num_clients=cfg.clients if remote is None else 0)
        run_dir = RunDir.create("fl", out)
        run_dir.write_config(to_mapping(cfg))
    run_dir = RunDir(run_dir.path.resolve())  # the daemons run in other working directories
    seen = len(run_dir.read_metrics())

    if split is not None:
        files = _write_data(run_dir, cfg, *split)
    else:
        files = prepare_data(run_dir, cfg) if remote is None else []
    status(f"run directory {run_dir.path}; starting the SuperLink and SuperNodes")
    app_dir = write_app(run_dir.file("app"))
    if remote is None:
        fed = Federation(run_dir.file("flower"), tls=_tls_files(run_dir, cfg), auth=cfg.auth)
    else:
        fed = Federation(run_dir.file("flower"), tls=remote.tls, auth=bool(remote.auth_keys), host=remote.host)
    with sigterm_as_interrupt(), fed:
        if remote is None:
            fed.start_superlink(timeout_s=cfg.startup_timeout_s)
            keys = _node_keys(run_dir, cfg) if cfg.auth else []
        else:
            fed.start_superlink(
                fleet_port=remote.fleet_port, control_port=remote.control_port, timeout_s=cfg.startup_timeout_s
            )
            keys = [(Path(), pub) for pub in remote.auth_keys]
        for _, pub in keys:
            fed.register_node(pub)
        for i, path in enumerate(files):
            node_config: dict[str, str | int | float] = {
                "partition-id": i, "num-partitions": cfg.clients, "data-path": str(path.resolve())
            }  # fmt: skip
            if cfg.warm_workers:
                node_config["worker"] = fed.start_worker(i)
            if fault := cfg.faults.get(str(i)):
                node_config["fault"] = fault
            fed.start_supernode(i, node_config=node_config, auth_key=keys[i][0] if keys else None)
        where = "local" if remote is None else "remote"
        _wait_for_workers(fed, cfg.startup_timeout_s)
        status(
            f"SuperLink on {fed.fleet_address} (gRPC Fleet API), {cfg.clients} {where} SuperNodes; "
            f"logs in {fed.workdir / 'logs'}"
        )
        run_id = fed.submit(app_dir, {"run-dir": str(run_dir.path.resolve())})
        status(f"submitted Flower run {run_id}")
        result = _follow(fed, run_dir, cfg, seen, on_round)
    metrics = run_dir.read_metrics()
    rejected = sum(int(m.get("rejected") or 0) for m in metrics)
    return RunResult(
        run_dir=run_dir.path,
        metrics=metrics,
        accuracy=float(result["accuracy"]),
        loss=float(result["loss"]),
        wall_s=time.monotonic() - started,
        rejected=rejected,
        extra={"privacy": result["privacy"]} if "privacy" in result else {},
    )


def _check_privacy(cfg: FlConfig) -> list[str]:
    """Refuse DP / SecAgg+ settings that cannot work with this aggregator or budget, before anything starts."""
    if not cfg.privacy.enabled:
        return []
    from fedge.plugins.aggregators import Sampling, build_strategy
    from fedge.plugins.fl.privacy import check_privacy

    strategy = build_strategy(cfg.aggregator, cfg.aggregator_options, Sampling(fraction_train=cfg.fraction_train))
    notes: list[str] = check_privacy(cfg, strategy)
    return notes


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


def _follow(
    fed: Federation, run: RunDir, cfg: FlConfig, seen: int, on_round: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    """Report new metrics until the ServerApp writes ``result.json``; fail fast when it cannot finish."""
    result_file = run.file("result.json")
    remaining = cfg.rounds - seen
    follow_start = time.monotonic()
    deadline = follow_start + 2 * cfg.startup_timeout_s + max(remaining, 1) * (cfg.round_timeout_s + 60)
    server_seen_at: float | None = None
    gone_since: float | None = None
    warned: set[str] = set()
    while True:
        metrics = run.read_metrics()
        for record in metrics[seen:]:
            if on_round is not None:
                on_round(record)
        seen = max(seen, len(metrics))
        if result_file.is_file():
            result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
            if result.get("status") != "completed":
                raise RuntimeFailure(f"the ServerApp failed: {result.get('error')}; see {fed.workdir / 'logs'}")
            return result
        for daemon in fed.dead():
            if daemon.name == "superlink":
                raise RuntimeFailure(
                    f"the SuperLink exited (code {daemon.proc.returncode}); see {daemon.log}"
                )
            if daemon.name not in warned:
                warned.add(daemon.name)
                logger.warning("%s exited (code %s); the run goes on without it", daemon.name, daemon.proc.returncode)
                if daemon.name.startswith("supernode-"):
                    _unregister(fed, daemon)
        now = time.monotonic()
        if fed.find("flwr-serverapp"):
            server_seen_at, gone_since = now, None
        elif server_seen_at is not None:
            gone_since = gone_since or now
            if now - gone_since > 5.0 and not result_file.is_file():
                raise RuntimeFailure(f"the ServerApp process ended without a result; see {fed.workdir / 'logs'}")
        elif now - follow_start > cfg.startup_timeout_s:
            raise RuntimeFailure(f"the ServerApp did not start within {cfg.startup_timeout_s:.0f} s; see {fed.workdir / 'logs'}")
        if now > deadline:
            raise RuntimeFailure(f"the run did not finish before its deadline; see {fed.workdir / 'logs'}")
        time.sleep(_POLL_S)
