"""``fedge fl``: federated learning on Flower's Deployment Engine (run, superlink, supernode, certs).

Only typer, the standard library and fedge's core are imported here; Flower and torch load inside commands.
Run ``fedge fl --help``.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.cli.options import config_options
from fedge.errors import ConfigError
from fedge.plugins.fl.privacy import PrivacyConfig

__all__ = ["app"]

app = typer.Typer(
    name="fl",
    help="Federated learning on Flower (SuperLink + SuperNodes over gRPC).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_TIMEOUT_HELP = (
    "Seconds the server waits for a round's replies; late or dead clients are dropped from it and not waited for "
    "again until they answer."
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_faults(faults: list[str] | None) -> dict[str, str] | None:
    if not faults:
        return None
    out = {}
    for item in faults:
        pid, sep, kind = item.partition("=")
        if not sep:
            raise ConfigError(f"bad --fault {item!r}; use PARTITION=KIND, e.g. 1=nan")
        out[pid.strip()] = kind.strip()
    return out


def _print_result(result: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    typer.echo(
        f"done: {len(result.metrics)} rounds, held-out accuracy {result.accuracy:.4f} (loss {result.loss:.4f}), "
        f"{result.wall_s:.0f} s; rejected updates {result.rejected}; run directory {result.run_dir}"
    )
    if spent := result.extra.get("privacy"):
        from fedge.plugins.fl.privacy import describe_spent

        typer.echo(describe_spent(spent))


def _run_with_progress(as_json: bool, rounds: int | None, **kwargs: Any) -> Any:
    from fedge.plugins.fl.runner import run

    if as_json:
        return run(**kwargs)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    # The display starts with the run's first status line, after the data was read: an error before that
    # (a missing dataset file, say) stays one line on stderr, with no progress bar above it.
    progress = Progress(
        TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console,
    )  # fmt: skip
    task = progress.add_task("starting SuperLink and SuperNodes", total=rounds)

    def on_round(m: dict[str, Any]) -> None:
        progress.start()
        total = progress.tasks[0].total
        progress.update(
            task, completed=m["round"], total=total,
            description=f"acc {m['accuracy']:.3f} loss {m['loss']:.3f} clients {m['num_clients']} "
            f"round {m['round_s'] or 0:.1f}s" + (f" rejected {m['rejected']}" if m.get("rejected") else ""),
        )  # fmt: skip
        progress.console.print(
            f"round {m['round']}: accuracy {m['accuracy']:.4f} loss {m['loss']:.4f} clients {m['num_clients']}"
            f" in {m['round_s'] or 0:.1f} s (client compute {m.get('client_compute_s') or 0:.1f} s)"
        )

    def on_status(line: str) -> None:
        started = progress.live.is_started
        progress.start()
        progress.console.print(line)
        if started:
            progress.update(task, description="running")

    try:
        return run(on_round=on_round, on_status=on_status, **kwargs)
    finally:
        if progress.live.is_started:  # Progress.stop() prints an empty line even when it never started
            progress.stop()


@app.command("run")
@config_options(PrivacyConfig, panel="Privacy (differential privacy, secure aggregation)")
def run_command(
    config: Annotated[Path | None, typer.Argument(help="TOML file with run settings (top level or an [fl] table).")] = None,
    clients: Annotated[int | None, typer.Option("--clients", "-n", help="Number of SuperNodes (clients).")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", "-r", help="Federated rounds.")] = None,
    aggregator: Annotated[str | None, typer.Option("--aggregator", "-a", help="Aggregator plugin, e.g. fedavg, fedmedian, krum.")] = None,
    partition: Annotated[str | None, typer.Option("--partition", help="iid, dirichlet:ALPHA or shards:K.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset plugin.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model plugin.")] = None,
    local_epochs: Annotated[int | None, typer.Option("--local-epochs", help="Client epochs per round.")] = None,
    fraction_train: Annotated[float | None, typer.Option("--fraction-train", help="Share of clients sampled per round.")] = None,
    min_clients: Annotated[int | None, typer.Option("--min-clients", help="Clients the first round waits for (0 = all).")] = None,
    round_timeout: Annotated[float | None, typer.Option("--round-timeout", help=_TIMEOUT_HELP)] = None,
    tls: Annotated[bool | None, typer.Option("--tls/--no-tls", help="TLS with a development CA made for this run.")] = None,
    auth: Annotated[bool | None, typer.Option("--auth/--no-auth", help="SuperNode authentication (registered keys); implies --tls.")] = None,
    fault: Annotated[list[str] | None, typer.Option("--fault", help="Inject a fault for robustness tests: PARTITION=nan|inf|shape|noise.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of partition, model and client shuffling.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue an interrupted run directory after its last checkpoint.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default runs/fl-<timestamp>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON (no progress display).")] = False,
    *,
    settings: dict[str, Any],
) -> int:
    """Run a federation on this machine: a SuperLink and N SuperNodes over gRPC on 127.0.0.1."""
    from fedge.plugins.fl.config import load_config

    if resume is not None:
        given = [f for f, v in (("CONFIG", config), ("--out", out)) if v is not None]
        given += [f"--{k.replace('_', '-')}" for k in settings]
        if given:
            raise ConfigError(f"--resume uses the run directory's own config.toml; drop {', '.join(given)}")
        if not (resume / "config.toml").is_file():
            raise ConfigError(f"cannot resume {str(resume)!r}: no config.toml there; pass a directory made by fedge fl run")
        cfg = load_config(resume / "config.toml")
        result = _run_with_progress(as_json, cfg.rounds, resume=resume)
    else:
        flags = {  # a flag left out is None, which load_config skips
            "clients": clients, "rounds": rounds, "aggregator": aggregator, "partition": partition,
            "dataset": dataset, "model": model, "local_epochs": local_epochs, "fraction_train": fraction_train,
            "min_clients": min_clients, "round_timeout_s": round_timeout, "tls": tls, "auth": auth,
            "faults": _parse_faults(fault), "seed": seed, "privacy": settings or None,
        }  # fmt: skip
        cfg = load_config(config, flags)
        _check_plugins(cfg, "fedge fl run")
        result = _run_with_progress(as_json, cfg.rounds, config=cfg, out=out)
    _print_result(result, as_json)
    return 0


def _check_plugins(cfg: Any, command: str) -> None:
    # Fail on a misspelt name or a bad option here, in one line, before any process starts or any run directory
    # is made. (The run itself then reads the data before it creates the run directory.)
    from fedge.config import from_mapping
    from fedge.plugins.data import dataset_config
    from fedge.registry import Kind, Registry

    for kind, name, options in (
        (Kind.AGGREGATOR, cfg.aggregator, cfg.aggregator_options), (Kind.MODEL, cfg.model, cfg.model_options)
    ):  # fmt: skip
        from_mapping(Registry(kind).get(name).Config, options, where=f"{kind}.{name}")
    dataset_config(cfg.dataset, cfg.dataset_options, command=command)


@app.command("superlink")
def superlink_command(
    config: Annotated[Path | None, typer.Argument(help="TOML file with run settings.")] = None,
    clients: Annotated[int | None, typer.Option("--clients", "-n", help="SuperNodes to wait for.")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", "-r", help="Federated rounds.")] = None,
    aggregator: Annotated[str | None, typer.Option("--aggregator", "-a", help="Aggregator plugin.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; non-loopback needs --certs or --insecure.")] = "0.0.0.0",
    fleet_port: Annotated[int, typer.Option("--fleet-port", help="Fleet API (gRPC) port for SuperNodes.")] = 9092,
    control_port: Annotated[int, typer.Option("--control-port", help="Control/Runtime HTTP API port.")] = 9093,
    certs: Annotated[Path | None, typer.Option("--certs", help="Directory from `fedge fl certs` (ca.crt, server.pem, server.key).")] = None,
    auth_keys: Annotated[list[Path] | None, typer.Option("--auth-key", help="Public key (.pub) of a SuperNode allowed to join; repeat per node.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plaintext on a non-loopback address.")] = False,
    round_timeout: Annotated[float | None, typer.Option("--round-timeout", help=_TIMEOUT_HELP)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> int:
    """Serve a federation to SuperNodes on other machines, run it, and write the run directory."""
    from fedge.plugins.fl.config import load_config
    from fedge.plugins.fl.federation import TlsFiles
    from fedge.plugins.fl.runner import RemoteNodes

    tls = None
    if certs is not None:
        ca_cert, server_cert, server_key = certs / "ca.crt", certs / "server.pem", certs / "server.key"
        missing = [str(p) for p in (ca_cert, server_cert, server_key) if not p.is_file()]
        if missing:
            raise ConfigError(f"missing TLS files {', '.join(missing)}; create them with: fedge fl certs --out {certs}")
        tls = TlsFiles(ca_cert=ca_cert, server_cert=server_cert, server_key=server_key)
    elif not _is_loopback(host) and not insecure:
        raise ConfigError(
            f"refusing to serve plaintext on {host}; pass --certs DIR (from `fedge fl certs`) or --insecure explicitly"
        )
    if auth_keys and tls is None:
        raise ConfigError("--auth-key needs TLS; pass --certs DIR")
    for key in auth_keys or []:
        if not key.is_file():
            raise ConfigError(f"public key {str(key)!r} not found; `fedge fl certs --nodes N` writes node-<i>.pub")
    flags = {"clients": clients, "rounds": rounds, "aggregator": aggregator, "round_timeout_s": round_timeout}
    cfg = load_config(config, flags)  # a flag left out is None, which load_config skips
    _check_plugins(cfg, "fedge fl superlink")
    remote = RemoteNodes(host=host, fleet_port=fleet_port, control_port=control_port, tls=tls,
                         auth_keys=tuple(k.resolve() for k in auth_keys or []))  # fmt: skip
    result = _run_with_progress(as_json, cfg.rounds, config=cfg, out=out, remote=remote)
    _print_result(result, as_json)
    return 0


@app.command("supernode")
def supernode_command(
    superlink: Annotated[str, typer.Option("--superlink", help="SuperLink Fleet API address HOST:PORT.")],
    partition: Annotated[str | None, typer.Option("--partition", help="This node's share I/N of --dataset, split by --split.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="This node's own data: .npz with x_train, y_train.")] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset plugin for --partition.")] = "digits",
    split: Annotated[str, typer.Option("--split", help="How --partition splits: iid, dirichlet:ALPHA, shards:K (same on every node).")] = "dirichlet:0.5",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split (same on every node).")] = 0,
    root_certificates: Annotated[Path | None, typer.Option("--root-certificates", help="CA certificate (ca.crt) to trust the SuperLink.")] = None,
    auth_key: Annotated[Path | None, typer.Option("--auth-key", help="This node's private key (node-<i>.key) for SuperNode authentication.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext to a non-loopback SuperLink.")] = False,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where logs, Flower state and the node's data file go.")] = Path("runs/supernode"),
    device: Annotated[str, typer.Option("--device", help="Where this node trains: auto (the GPU if torch sees one), cpu or cuda.")] = "auto",
) -> int:
    """Join a SuperLink as one client (a SuperNode in the foreground until Ctrl-C or the SuperLink goes away)."""
    import time

    from fedge.plugins.fl.federation import Federation, TlsFiles, sigterm_as_interrupt

    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"bad --superlink {superlink!r}; use HOST:PORT, e.g. 192.168.1.10:9092")
    if root_certificates is None and not _is_loopback(host) and not insecure:
        raise ConfigError(f"refusing plaintext to {host}; pass --root-certificates ca.crt or --insecure explicitly")
    if auth_key is not None and root_certificates is None:
        raise ConfigError("--auth-key needs TLS; pass --root-certificates ca.crt")
    for path in (p for p in (root_certificates, auth_key, data) if p is not None):
        if not path.is_file():
            raise ConfigError(f"file {str(path)!r} not found")
    if (data is None) == (partition is None):
        raise ConfigError("give exactly one of --data FILE.npz or --partition I/N")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    node_config: dict[str, str | int | float] = {}
    if partition is not None:
        data = _materialize_partition(workdir, partition, dataset, split, seed)
        node_config["partition-id"], node_config["num-partitions"] = (int(v) for v in partition.split("/"))
    assert data is not None
    node_config["data-path"] = str(data.resolve())
    node_config["device"] = device
    tls = TlsFiles(ca_cert=root_certificates.resolve()) if root_certificates else None
    fed = Federation(workdir / "flower", tls=tls, host=host)
    fed.fleet_port = int(port)
    with sigterm_as_interrupt(), fed:
        node_config["worker"] = fed.start_worker(0)
        daemon = fed.start_supernode(0, node_config=node_config, auth_key=auth_key.resolve() if auth_key else None)
        typer.echo(f"SuperNode started (pid {daemon.proc.pid}) for {superlink}; log: {daemon.log}; Ctrl-C stops it", err=True)
        while daemon.proc.poll() is None:
            time.sleep(0.5)
    return 0 if daemon.proc.returncode == 0 else 3


def _materialize_partition(workdir: Path, spec: str, dataset: str, split: str, seed: int) -> Path:
    import numpy as np

    from fedge.config import parse_partition
    from fedge.plugins.data import load_dataset
    from fedge.plugins.data import partition as split_indices

    try:
        index, total = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ConfigError(f"bad --partition {spec!r}; use I/N, e.g. 0/3") from None
    if not 0 <= index < total:
        raise ConfigError(f"bad --partition {spec!r}: I must be in 0..N-1")
    ds = load_dataset(dataset)
    idx = split_indices(ds.y_train, total, parse_partition(split, seed=seed))[index]
    path = workdir / f"{dataset}-{index}-of-{total}.npz"
    np.savez(path, x_train=ds.x_train[idx], y_train=ds.y_train[idx])
    return path


@app.command("certs")
def certs_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for ca.crt, ca.key, server.pem, server.key.")] = Path("certs"),
    host: Annotated[list[str] | None, typer.Option("--host", help="Extra name or IP the SuperLink is reached at (SAN); repeatable.")] = None,
    nodes: Annotated[int, typer.Option("--nodes", help="Also write node-<i>.key/.pub key pairs for SuperNode authentication.")] = 0,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 30,
) -> int:
    """Create a development CA and a SuperLink certificate (127.0.0.1 and localhost always in its SAN)."""
    from fedge.plugins.fl.certs import make_certs, make_node_keys

    if nodes < 0 or days < 1:
        raise ConfigError("--nodes must be >= 0 and --days >= 1")
    paths = make_certs(out, hosts=[*(host or []), socket.gethostname()], days=days)
    typer.echo(f"CA: {paths.ca_cert}\nserver certificate: {paths.server_cert}\nserver key: {paths.server_key}")
    for key, pub in make_node_keys(out, num_nodes=nodes) if nodes else []:
        typer.echo(f"node key: {key} (public: {pub})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
