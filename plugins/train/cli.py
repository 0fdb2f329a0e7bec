"""``fedge train``: cluster training through torchrun with a strategy plugin (gloo on CPU, NCCL on GPU).

Example::

    fedge train --strategy ring-allreduce --nproc 2 --steps 200 --checkpoint-every 50
    fedge train --strategy parameter-server --nproc 3 --async -o staleness=4
    fedge train --resume runs/train-20260101-120000 --steps 400
    fedge train --nproc 4 --nnodes 2 --rdzv-endpoint node0:29400    # the same command on each of 2 nodes
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.config import from_mapping, load_toml, merge, to_mapping
from fedge.errors import ConfigError, PluginNotFoundError
from fedge.plugins.train.config import TrainConfig, parse_nnodes
from fedge.registry import Kind, Registry
from fedge.rundir import RunDir

__all__ = ["build_config", "parse_options", "train"]

logger = logging.getLogger(__name__)

_PANEL_JOB = "Job and launch"
_PANEL_STRATEGY = "Strategy"


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["chunk_bytes=65536", "mode=async"]`` -> a dict (values stay strings; the Config coerces them)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option takes KEY=VALUE (e.g. -o chunk_bytes=65536), got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def build_config(base: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """The resolved job config: ``base`` (TOML) with the flags that were given laid over it."""
    return from_mapping(TrainConfig, merge(base, flags))


def _read_node(path: Path) -> dict[str, Any] | None:
    try:
        node: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return node


def _node_line(node: dict[str, Any]) -> str:
    """Which node of the job this is, and where rank 0's outputs are."""
    lo, hi = node["ranks"]
    ranks = f"rank {lo}" if lo == hi else f"ranks {lo}-{hi}"
    where = (
        "this node writes metrics.jsonl, model.pt and summary.json"
        if node["node_rank"] == 0
        else f"node 0 ({node['rank0_host']}) writes metrics.jsonl, model.pt and summary.json to its run directory"
    )
    return f"node {node['node_rank']} of {node['num_nodes']} ({ranks} of {node['world_size']}); {where}"


def _progress_printer(total_hint: int | None, node_path: Path | None = None) -> Any:
    """A callback that prints which node this is (multi-node jobs: when the rendezvous places it, again after
    a re-rendezvous) and the newest metrics line at most once a second (reads only new bytes)."""
    state: dict[str, Any] = {"offset": 0, "last": 0.0, "record": None, "node": None}

    def show(run: RunDir) -> None:
        node = _read_node(node_path) if node_path is not None and node_path.is_file() else None
        if node is not None and node != state["node"]:
            state["node"] = node
            typer.echo(f"fedge train: {_node_line(node)}", err=True)
        path = run.file("metrics.jsonl")
        if not path.is_file():
            return
        if path.stat().st_size < state["offset"]:  # rewritten on resume
            state["offset"] = 0
        with open(path, "rb") as f:
            f.seek(state["offset"])
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        state["offset"] += len(complete)
        for line in complete.splitlines():
            try:
                state["record"] = json.loads(line)
            except json.JSONDecodeError:
                continue
        now = time.monotonic()
        if state["record"] is None or now - state["last"] < 1.0:
            return
        state["last"], r, state["record"] = now, state["record"], None
        of = f"/{total_hint}" if total_hint else ""
        typer.echo(f"step {r['step']}{of}  loss {r['loss']:.4f}  {r['samples_per_s']:.0f} samples/s", err=True)

    return show


def train(
    config_file: Annotated[Path | None, typer.Argument(help="TOML file of settings; flags override it.")] = None,
    strategy: Annotated[str | None, typer.Option("--strategy", "-s", help="Strategy plugin, e.g. allreduce, ring-allreduce, tree-allreduce, parameter-server.", rich_help_panel=_PANEL_STRATEGY)] = None,
    nproc: Annotated[int | None, typer.Option("--nproc", help="Processes per node.", rich_help_panel=_PANEL_JOB)] = None,
    nnodes: Annotated[str | None, typer.Option("--nnodes", help="Nodes: N, or MIN:MAX for an elastic job.", rich_help_panel=_PANEL_JOB)] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (multi-node).", rich_help_panel=_PANEL_JOB)] = None,
    rdzv_id: Annotated[str | None, typer.Option("--rdzv-id", help="Rendezvous id, the same on every node.", rich_help_panel=_PANEL_JOB)] = None,
    rdzv_timeout: Annotated[float | None, typer.Option("--rdzv-timeout", help="Seconds to wait for the endpoint and the other nodes.", rich_help_panel=_PANEL_JOB)] = None,
    rdzv_last_call: Annotated[float | None, typer.Option("--rdzv-last-call", help="Elastic --nnodes MIN:MAX: seconds to wait for more nodes once MIN have joined (default 30).", rich_help_panel=_PANEL_JOB)] = None,
    max_restarts: Annotated[int | None, typer.Option("--max-restarts", help="Restarts after a worker failure; each resumes from the last checkpoint.", rich_help_panel=_PANEL_JOB)] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="auto (NCCL if every rank has a GPU, else gloo), gloo or nccl.", rich_help_panel=_PANEL_JOB)] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto (CUDA with NCCL, else CPU), cpu or cuda (gloo: several ranks may share a GPU).", rich_help_panel=_PANEL_JOB)] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds before process-group creation or a collective gives up.", rich_help_panel=_PANEL_JOB)] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model plugin (mlp, cnn, tiny-gpt, ...).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset plugin (digits, npz, csv, ...).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the training set (instead of --steps).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Global batch size (all ranks together).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the initial weights and the batch order.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.", rich_help_panel=_PANEL_STRATEGY)] = None,
    lr_scaling: Annotated[str | None, typer.Option("--lr-scaling", help="none, or linear: lr x batch / base_batch_size.", rich_help_panel=_PANEL_STRATEGY)] = None,
    warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", help="Linear lr warm-up steps (with --lr-scaling linear).", rich_help_panel=_PANEL_STRATEGY)] = None,
    sync: Annotated[bool | None, typer.Option("--sync/--async", help="parameter-server: synchronous or asynchronous updates.", rich_help_panel=_PANEL_STRATEGY)] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="A strategy Config field, KEY=VALUE (repeatable).", rich_help_panel=_PANEL_STRATEGY)] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0: never).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory from its last checkpoint.")] = None,
    profile: Annotated[bool | None, typer.Option("--profile", help="Write one torch.profiler trace per rank to RUN_DIR/traces/.")] = None,
    fault_at: Annotated[str | None, typer.Option("--fault-at", help="Fault drill RANK:STEP: that rank SIGKILLs itself once.", hidden=True)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/train-<timestamp>/).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
) -> int:
    """Train one model across processes (and machines) with a strategy, launched by torchrun."""
    from fedge.plugins.train.launcher import launch, node_file
    from fedge.plugins.train.worker import resolve_strategy, strategy_config

    base: dict[str, Any] = {}
    if resume is not None:
        if not (resume / "config.toml").is_file():
            raise ConfigError(f"--resume {str(resume)!r}: not a fedge train run directory (no config.toml)")
        if not (resume / "checkpoints" / "latest.json").is_file():
            raise ConfigError(f"--resume {str(resume)!r}: the run has no checkpoint yet; start it again instead")
        if out is not None and out.resolve() != resume.resolve():
            raise ConfigError("--resume continues in the run's own directory; leave --out out")
        base = load_toml(resume / "config.toml")
        out = resume
    if config_file is not None:
        base = merge(base, load_toml(config_file))
    strategy_flags = {"lr": lr, "lr_scaling": lr_scaling, "warmup_steps": warmup_steps, **parse_options(option or [])}
    if sync is not None:
        strategy_flags["mode"] = "sync" if sync else "async"
    flags = {
        "strategy": strategy, "nproc": nproc, "nnodes": nnodes, "rdzv_endpoint": rdzv_endpoint, "rdzv_id": rdzv_id,
        "rdzv_timeout_s": rdzv_timeout, "rdzv_last_call_s": rdzv_last_call, "max_restarts": max_restarts, "backend": backend, "device": device, "timeout_s": timeout,
        "model": model, "dataset": dataset, "steps": steps, "epochs": epochs, "batch_size": batch_size, "seed": seed,
        "checkpoint_every": checkpoint_every, "profile": profile, "fault_at": fault_at,
        "strategy_options": {k: v for k, v in strategy_flags.items() if v is not None},
    }
    if strategy is not None and base.get("strategy") not in (None, strategy):
        base = {k: v for k, v in base.items() if k != "strategy_options"}  # another strategy's options do not apply
    cfg = build_config(base, flags)

    # Fail before any process starts: unknown strategy, bad options, a world size it cannot use.
    for kind, name in ((Kind.DATASET, cfg.dataset), (Kind.MODEL, cfg.model)):
        names = Registry(kind).names()
        if name not in names:
            raise PluginNotFoundError(f"unknown {kind} {name!r}; valid: {', '.join(names) or 'none installed'}")
    from fedge.plugins.data import dataset_config

    dataset_config(cfg.dataset, cfg.dataset_options, command="fedge train")
    cls = resolve_strategy(cfg.strategy)
    scfg = strategy_config(cls, cfg.strategy_options, cfg.strategy)
    lo, hi = parse_nnodes(cfg.nnodes)
    for nodes in range(lo, hi + 1):
        cls.check_world_size(scfg, nodes * cfg.nproc, cfg.batch_size)
    if rdzv_last_call is not None and lo == hi:
        logger.warning("--rdzv-last-call has no effect: only an elastic --nnodes MIN:MAX waits for more nodes")

    run = RunDir.create("train", out, resume=resume is not None, resumable=True)
    run.write_config(to_mapping(cfg))
    typer.echo(f"fedge train: {cfg.strategy} on {cfg.nnodes} x {cfg.nproc} processes -> {run.path}", err=True)
    node_path = None
    if cfg.rdzv_endpoint:
        node_path = node_file(run)
        node_path.unlink(missing_ok=True)  # from an earlier launch in this directory
        typer.echo(f"fedge train: {_waiting_line(cfg, lo, hi)}", err=True)
    launch(cfg, run, on_progress=_progress_printer(None if cfg.epochs else cfg.steps, node_path))
    summary_file = run.file("summary.json")
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    node = _read_node(node_path) if node_path is not None and node_path.is_file() else None
    where = {k: node[k] for k in ("node_rank", "num_nodes", "rank0_host")} if node else {}
    if as_json:
        typer.echo(json.dumps({"run_dir": str(run.path), **where, **summary}, indent=2))
    elif summary:
        typer.echo(
            f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"test accuracy {summary['test_accuracy']:.4f}; model in {run.path / 'model.pt'}"
        )
    elif node:
        typer.echo(
            f"done: node {node['node_rank']} of {node['num_nodes']} finished; metrics.jsonl, model.pt and "
            f"summary.json are in the run directory of node 0 ({node['rank0_host']})"
        )
    return 0


def _waiting_line(cfg: TrainConfig, lo: int, hi: int) -> str:
    """What this node waits for before training starts (the first node otherwise looks stuck)."""
    at = f"at {cfg.rdzv_endpoint} (rendezvous id {cfg.rdzv_id}, up to {cfg.rdzv_timeout_s:g}s)"
    if lo == hi:
        return f"waiting for {hi} node{'s' if hi > 1 else ''} {at}"
    return (
        f"waiting for {lo} to {hi} nodes {at}; training starts when {hi} have joined, or "
        f"{cfg.rdzv_last_call_s:g}s (--rdzv-last-call) after {lo} have"
    )
