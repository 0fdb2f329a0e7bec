"""``fedge fl``: federated learning on Flower's Deployment Engine (run, superlink, supernode, certs).

Only typer, the standard library and fedge's core are imported here; Flower and torch load inside commands.
Run ``fedge fl --help``.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import math
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from fedge.cli.options import config_options
from fedge.errors import ConfigError, Interrupted
from fedge.plugins.fl.config import FlConfig
from fedge.plugins.fl.flower_internals import DEFAULT_POLL_S, check_poll_s
from fedge.plugins.fl.privacy import PrivacyConfig

if TYPE_CHECKING:
    from fedge.config import PartitionConfig
    from fedge.rundir import RunDir

__all__ = ["app"]

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="fl",
    help="Federated learning on Flower (SuperLink + SuperNodes over gRPC).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_pairs(items: list[str], flag: str, form: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad {flag} {item!r}; use {form}")
        out[key.strip()] = value.strip()
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


_LOCAL_ONLY = ("tls", "auth", "warm_workers", "supernode_poll_s")  # settings of a federation whose SuperNodes run here
_TABLES = ("dataset_options", "model_options", "aggregator_options", "faults", "client_profiles", "privacy")  # tables
_FLAGS = {"clients": "-n", "rounds": "-r", "aggregator": "-a", "round_timeout_s": "--round-timeout"}


def _privacy_flags(func: F) -> F:
    """Add PrivacyConfig's flags (their own help panel) to a command made by ``config_options(FlConfig)``; the
    flags given reach it as ``privacy``, the ``[fl.privacy]`` table's overrides."""
    sig = inspect.signature(func)

    def command(*args: Any, settings: dict[str, Any], **kwargs: Any) -> Any:
        return func(*args, privacy=settings, **kwargs)

    params = [p for p in sig.parameters.values() if p.name != "privacy"]
    params.append(inspect.Parameter("settings", inspect.Parameter.KEYWORD_ONLY, annotation=dict[str, Any]))
    command.__signature__ = sig.replace(parameters=sorted(params, key=lambda p: p.kind))  # type: ignore[attr-defined]
    command.__name__, command.__doc__ = func.__name__, func.__doc__
    return config_options(PrivacyConfig, panel="Privacy (differential privacy, secure aggregation)")(command)  # type: ignore[return-value]


def _settings(config: Path | None, settings: dict[str, Any], options: list[str] | None, faults: list[str] | None) -> Any:
    """The run config: TOML file, flags laid over it, then checked (plugins, options, client counts) in one place."""
    from fedge.config import merge
    from fedge.plugins.fl.config import load_config

    if config is not None and config.is_dir():
        raise ConfigError(
            f"{str(config)!r} is a directory, not a TOML file; to continue a run there: fedge fl run --resume {config}"
        )
    extra: dict[str, Any] = {}
    if options:
        extra["aggregator_options"] = _parse_pairs(options, "--aggregator-option", "KEY=VALUE, e.g. beta=0.2")
    if faults:
        extra["faults"] = _parse_pairs(faults, "--fault", "PARTITION=KIND, e.g. 1=nan")
    return load_config(config, merge(settings, extra))


@app.command("run")
@_privacy_flags
@config_options(FlConfig, exclude=_TABLES, short=_FLAGS)
def run_command(
    config: Annotated[Path | None, typer.Argument(help="TOML file with run settings (top level or an \\[fl] table).")] = None,
    aggregator_option: Annotated[list[str] | None, typer.Option("--aggregator-option", "-O", help="An option of the aggregator, KEY=VALUE; repeatable.")] = None,
    fault: Annotated[list[str] | None, typer.Option("--fault", help="Inject a fault for robustness tests: PARTITION=nan|inf|shape|noise.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue an interrupted run directory after its last checkpoint.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default runs/fl-<timestamp>); one that holds a run is refused.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out whole (kept if this run fails).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON (no progress display).")] = False,
    *,
    settings: dict[str, Any],
    privacy: dict[str, Any] | None = None,
) -> int:
    """Run a federation on this machine: a SuperLink and N SuperNodes over gRPC on 127.0.0.1."""
    from fedge.plugins.fl.runner import _resumed_config

    if resume is not None:
        given = [f for f, v in (("CONFIG", config), ("--out", out), ("--overwrite", overwrite or None)) if v is not None]
        given += [f"--{k.replace('_', '-')}" for k in {**settings, **(privacy or {})}] + ["--fault"] * bool(fault)
        if given:
            raise ConfigError(f"--resume uses the run directory's own config.toml; drop {', '.join(given)}")
        cfg = _resumed_config(resume)
        result = _run_with_progress(as_json, cfg.rounds, resume=resume)
    else:
        cfg = _settings(config, {**settings, "privacy": privacy or None}, aggregator_option, fault)
        _check_plugins(cfg, "fedge fl run")
        result = _run_with_progress(as_json, cfg.rounds, config=cfg, out=out, overwrite=overwrite)
    _print_result(result, as_json)
    return 0


def _check_plugins(cfg: Any, command: str) -> None:
    # Fail on a misspelt name, a bad option or a client count the aggregator cannot work with, in one line,
    # before any process starts or any run directory is made. (The run then reads the data before it creates
    # the run directory.)
    from fedge.plugins.data import dataset_config
    from fedge.plugins.fl.runner import check_before_start
    from fedge.registry import Kind, Registry

    Registry(Kind.MODEL).choose(cfg.model, cfg.model_options, where=f"model.{cfg.model}")
    check_before_start(cfg)
    dataset_config(cfg.dataset, cfg.dataset_options, command=command)


def _check_port(flag: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag} must be a TCP port in 1..65535; got {port}")


@app.command("superlink")
@_privacy_flags
@config_options(FlConfig, exclude=(*_TABLES, *_LOCAL_ONLY), short=_FLAGS)
def superlink_command(
    config: Annotated[Path | None, typer.Argument(help="TOML file with run settings.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; non-loopback needs --certs or --insecure.")] = "0.0.0.0",
    fleet_port: Annotated[int, typer.Option("--fleet-port", help="Fleet API (gRPC) port for SuperNodes.")] = 9092,
    control_port: Annotated[int, typer.Option("--control-port", help="Control/Runtime HTTP API port.")] = 9093,
    certs: Annotated[Path | None, typer.Option("--certs", help="Directory from `fedge fl certs` (ca.crt, server.pem, server.key).")] = None,
    auth_keys: Annotated[list[Path] | None, typer.Option("--auth-key", help="Public key (.pub) of a SuperNode allowed to join; repeat per node.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plaintext on a non-loopback address.")] = False,
    aggregator_option: Annotated[list[str] | None, typer.Option("--aggregator-option", "-O", help="An option of the aggregator, KEY=VALUE; repeatable.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory; one that holds a run is refused.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out whole.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    *,
    settings: dict[str, Any],
    privacy: dict[str, Any] | None = None,
) -> int:
    """Serve a federation to SuperNodes on other machines, run it, and write the run directory."""
    from fedge.plugins.fl.federation import TlsFiles
    from fedge.plugins.fl.runner import RemoteNodes

    _check_port("--fleet-port", fleet_port)
    _check_port("--control-port", control_port)
    if fleet_port == control_port:
        raise ConfigError(f"--fleet-port and --control-port must differ; both are {fleet_port}")
    from fedge.plugins.fl.federation import check_port_free

    for flag, port in (("--fleet-port", fleet_port), ("--control-port", control_port)):
        check_port_free(host, port, flag)  # before any run directory exists
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
        _check_public_key(key)
    cfg = _settings(config, {**settings, "privacy": privacy or None}, aggregator_option, None)
    _check_plugins(cfg, "fedge fl superlink")
    remote = RemoteNodes(host=host, fleet_port=fleet_port, control_port=control_port, tls=tls,
                         auth_keys=tuple(k.resolve() for k in auth_keys or []))  # fmt: skip
    result = _run_with_progress(as_json, cfg.rounds, config=cfg, out=out, overwrite=overwrite, remote=remote)
    _print_result(result, as_json)
    return 0


def _check_public_key(key: Path) -> None:
    if not key.is_file():
        raise ConfigError(f"public key {str(key)!r} not found; `fedge fl certs --nodes N` writes node-<i>.pub")
    try:
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key

        load_ssh_public_key(key.read_bytes())
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(
            f"--auth-key {str(key)!r} is not an OpenSSH public key ({err}); pass a node-<i>.pub from `fedge fl certs --nodes N`"
        ) from None


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
    connect_timeout: Annotated[float, typer.Option("--connect-timeout", help="Seconds to keep trying to join the SuperLink before giving up.")] = 60.0,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where logs, Flower state and the node's data file go.")] = Path("runs/supernode"),
    device: Annotated[str, typer.Option("--device", help="Where this node trains: auto (the GPU if torch sees one), cpu or cuda.")] = "auto",
    poll_s: Annotated[float, typer.Option("--poll-s", help="Seconds between requests for a message while idle (Flower's own SuperNode: 3).")] = DEFAULT_POLL_S,
) -> int:
    """Join a SuperLink as one client (a SuperNode in the foreground until Ctrl-C or the SuperLink goes away)."""
    from fedge.plugins.fl.federation import Federation, TlsFiles
    from fedge.supervisor import sigterm_as_interrupt

    host, port = _parse_address(superlink)
    _check_node_flags(host, connect_timeout=connect_timeout, root_certificates=root_certificates, auth_key=auth_key,
                      insecure=insecure, data=data, partition=partition, device=device, poll_s=poll_s)  # fmt: skip
    from fedge.plugins.fl.flower_internals import check_supernode_poll

    check_supernode_poll()  # a changed Flower: one line before the workdir exists
    node_config: dict[str, str | int | float] = {}
    if data is not None:
        _check_node_data(data)
        _open_workdir(workdir)
    else:
        assert partition is not None
        index, total = _parse_share(partition)
        scheme = _parse_split(split, seed)
        from fedge.plugins.data import dataset_config

        dataset_config(dataset, {}, command="fedge fl supernode")  # a misspelt name: one line, nothing written
        share = {"dataset": dataset, "partition": f"{index}/{total}", "split": split, "seed": seed}
        node = _open_workdir(workdir, share=share)
        data = _materialize_partition(workdir, index, total, dataset, scheme)
        if _stored_share(workdir) is None:  # recorded once the share was made
            node.write_json("node.json", share)
        node_config["partition-id"], node_config["num-partitions"] = index, total
    node_config["data-path"] = str(data.resolve())
    node_config["device"] = device
    tls = TlsFiles(ca_cert=root_certificates.resolve()) if root_certificates else None
    fed = Federation(workdir / "flower", tls=tls, host=host, supernode_poll_s=poll_s)
    fed.fleet_port = port
    try:
        with sigterm_as_interrupt(), fed:
            node_config["worker"] = fed.start_worker(0)
            daemon = fed.start_supernode(0, node_config=node_config, auth_key=auth_key.resolve() if auth_key else None)
            typer.echo(f"SuperNode started (pid {daemon.proc.pid}) for {superlink}; log: {daemon.log}; Ctrl-C stops it", err=True)
            _wait_until_joined(daemon, superlink, connect_timeout)
            while daemon.proc.poll() is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped the SuperNode for {superlink}; kept {workdir}; the same command starts it again") from None
    return 0 if daemon.proc.returncode == 0 else 3


def _open_workdir(workdir: Path, share: dict[str, Any] | None = None) -> RunDir:
    """A SuperNode reopens its own workdir across restarts, but never writes into another command's run, nor
    replaces the data file of another share (``share``: what ``--partition`` made there, kept in node.json)."""
    from fedge.rundir import RunDir, a_run, run_kind

    held = run_kind(workdir)
    if held not in (None, "supernode"):
        raise ConfigError(f"--workdir {str(workdir)!r} already holds {a_run(held)}; the node's files would mix into it: choose another --workdir")
    before = _stored_share(workdir) if held == "supernode" else None
    if share is not None and before is not None and before != share:
        shown = "; ".join(f"{k} is {before.get(k)!r} there but {share[k]!r} here" for k in share if before.get(k) != share[k])
        raise ConfigError(
            f"--workdir {str(workdir)!r} holds the node of another data share ({shown}); its data file would be "
            "replaced: give the same --dataset/--partition/--split/--seed, or another --workdir"
        )
    return RunDir.create("supernode", workdir, resume=held == "supernode", flag="--workdir")


def _stored_share(workdir: Path) -> dict[str, Any] | None:
    try:
        stored = json.loads((workdir / "node.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"--workdir {str(workdir)!r}: node.json is unreadable ({err}); choose another --workdir") from None
    return stored if isinstance(stored, dict) else None


def _check_node_flags(
    host: str, *, connect_timeout: float, root_certificates: Path | None, auth_key: Path | None, insecure: bool,
    data: Path | None, partition: str | None, device: str, poll_s: float,
) -> None:
    """``fedge fl supernode``'s flags that can be checked before anything starts."""
    if not (math.isfinite(connect_timeout) and connect_timeout > 0):
        raise ConfigError(f"--connect-timeout must be a finite number of seconds > 0; got {connect_timeout}")
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
    check_poll_s(poll_s, name="--poll-s")


def _parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"bad --superlink {address!r}; use HOST:PORT, e.g. 192.168.1.10:9092")
    _check_port("--superlink port", int(port))
    return host.strip("[]"), int(port)


def _wait_until_joined(daemon: Any, superlink: str, timeout_s: float) -> None:
    """Say on the terminal when the SuperLink cannot be reached; give up after ``timeout_s`` (one line)."""
    from fedge.errors import RuntimeFailure
    from fedge.plugins.fl.federation import _logged_node_id, log_cause

    started, warned = time.monotonic(), False
    while _logged_node_id(daemon.log) is None:
        if daemon.proc.poll() is not None:
            cause = log_cause(daemon.log) or f"exit code {daemon.proc.returncode}"
            raise RuntimeFailure(f"the SuperNode stopped before joining {superlink}: {cause}; see {daemon.log}")
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise RuntimeFailure(
                f"could not join the SuperLink at {superlink} within {timeout_s:.0f} s (--connect-timeout); "
                "check the address, that `fedge fl superlink` runs there, and the firewall"
            )
        if waited > 3.0 and not warned:
            warned = True
            typer.echo(f"cannot reach the SuperLink at {superlink} yet; retrying for up to {timeout_s:.0f} s", err=True)
        time.sleep(0.25)
    if warned:
        typer.echo(f"joined the SuperLink at {superlink}", err=True)


def _check_node_data(path: Path) -> None:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in ("x_train", "y_train") if k not in arrays.files]
            if missing:
                raise ConfigError(f"--data {str(path)!r} lacks {', '.join(missing)} (it holds {', '.join(arrays.files) or 'nothing'}); save it with np.savez(path, x_train=X, y_train=y)")
            x, y = arrays["x_train"], arrays["y_train"]
    except (OSError, ValueError) as err:
        raise ConfigError(f"--data {str(path)!r} is not a readable .npz file ({err}); save it with np.savez(path, x_train=X, y_train=y)") from None
    if len(x) == 0 or len(x) != len(y) or y.ndim != 1:
        raise ConfigError(f"--data {str(path)!r}: x_train has {len(x)} rows and y_train shape {y.shape}; expected the same non-zero number of samples and 1-D labels")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.integer)):
        raise ConfigError(f"--data {str(path)!r}: x_train must be numeric and y_train integer labels; got {x.dtype} and {y.dtype}")


def _parse_share(spec: str) -> tuple[int, int]:
    try:
        index, total = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ConfigError(f"bad --partition {spec!r}; use I/N, e.g. 0/3") from None
    if not 0 <= index < total:
        raise ConfigError(f"bad --partition {spec!r}: I must be in 0..N-1")
    return index, total


def _parse_split(split: str, seed: int) -> PartitionConfig:
    from fedge.config import parse_partition

    scheme = parse_partition(split, seed=seed)
    if not math.isfinite(scheme.alpha):
        raise ConfigError(f"bad --split {split!r}: ALPHA must be a finite number > 0, e.g. dirichlet:0.5")
    return scheme


def _materialize_partition(workdir: Path, index: int, total: int, dataset: str, scheme: PartitionConfig) -> Path:
    from fedge.plugins.data import load_dataset
    from fedge.plugins.data import partition as split_indices
    from fedge.plugins.fl.runner import _savez

    ds = load_dataset(dataset)
    idx = split_indices(ds.y_train, total, scheme)[index]
    path = workdir / f"{dataset}-{index}-of-{total}.npz"
    _savez(path, x_train=ds.x_train[idx], y_train=ds.y_train[idx])
    return path


@app.command("certs")
def certs_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for ca.crt, ca.key, server.pem, server.key.")] = Path("certs"),
    host: Annotated[list[str] | None, typer.Option("--host", help="Extra name or IP the SuperLink is reached at (SAN); repeatable.")] = None,
    nodes: Annotated[int, typer.Option("--nodes", help="Also write node-<i>.key/.pub key pairs for SuperNode authentication.")] = 0,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 30,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace certificates and keys already in --out (deployed nodes stop working).")] = False,
) -> int:
    """Create a development CA and a SuperLink certificate (127.0.0.1 and localhost always in its SAN)."""
    from fedge.plugins.fl.certs import make_certs, make_node_keys
    from fedge.rundir import RunDir

    if not 0 <= nodes <= 10_000:
        raise ConfigError(f"--nodes must be between 0 and 10000; got {nodes}")
    if not 1 <= days <= 36_500:
        raise ConfigError(f"--days must be between 1 and 36500; got {days}")
    for name in host or []:
        if not name.strip() or any(c.isspace() for c in name):
            raise ConfigError(f"bad --host {name!r}; give a DNS name or an IP address")
    if out.is_dir() and any((out / f).exists() for f in ("ca.crt", "ca.key", "server.pem", "server.key")) and not overwrite:
        raise ConfigError(
            f"{str(out)!r} already holds certificates; nodes deployed with them would stop working. "
            "Choose another --out, or pass --overwrite to replace them"
        )
    with RunDir.create("certs", out, overwrite=overwrite) as run:
        paths = make_certs(run.path, hosts=[*(host or []), socket.gethostname()], days=days)
        pairs = make_node_keys(run.path, num_nodes=nodes) if nodes else []
    typer.echo(f"CA: {paths.ca_cert}\nserver certificate: {paths.server_cert}\nserver key: {paths.server_key}")
    for key, pub in pairs:
        typer.echo(f"node key: {key} (public: {pub})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
