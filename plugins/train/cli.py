"""``fedge train``: cluster training through torchrun with a strategy plugin (gloo on CPU, NCCL on GPU).

Example::

    fedge train --strategy ring-allreduce --nproc 2 --steps 200 --checkpoint-every 50
    fedge train --strategy parameter-server --nproc 3 -o mode=async -o staleness=4
    fedge train --strategy parameter-server --help      # the strategy's options, with their docs
    fedge train --resume runs/train-20260101-120000 --steps 400
    fedge train --nproc 4 --nnodes 2 --rdzv-endpoint node0:29400    # the same command on each of 2 nodes
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.markup import escape

from fedge.cli.options import config_options
from fedge.config import describe, from_mapping, load_toml, merge, to_mapping
from fedge.errors import ConfigError, FedgeError, Interrupted, PluginNotFoundError
from fedge.plugins.train.config import NODE_SETTINGS, TrainConfig, parse_nnodes
from fedge.registry import Kind, Registry
from fedge.rundir import RunDir, run_kind

__all__ = ["build_config", "parse_options", "strategy_help", "train"]

logger = logging.getLogger(__name__)

_PANEL_STRATEGY = "Strategy"
_HELP = {d.name: d.doc for d in describe(TrainConfig)}
# Flags that once existed; each names what replaced it.
_GONE = {
    "sync": "--sync/--async are parameter-server options now: use -o mode=sync or -o mode=async",
    "lr_scaling": "--lr-scaling is a strategy option now: use -o lr_scaling=linear",
    "warmup_steps": "--warmup-steps is a strategy option now: use -o warmup_steps=N",
}


def parse_options(pairs: list[str], *, flag: str = "--option") -> dict[str, Any]:
    """``["chunk_bytes=65536", "mode=async"]`` -> a dict (values stay strings; the Config coerces them)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            example = "-o chunk_bytes=65536" if flag == "--option" else f"{flag} hidden=64,32"
            raise ConfigError(f"{flag} takes KEY=VALUE (e.g. {example}), got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def build_config(base: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """The resolved job config: ``base`` (TOML) with the flags that were given laid over it."""
    return from_mapping(TrainConfig, merge(base, flags))


def strategy_help(name: str) -> str:
    """The options of strategy ``name``, one paragraph each (``-o KEY=VALUE``), from its Config's docs."""
    from fedge.plugins.train.base import resolve_strategy

    cls = resolve_strategy(name)
    lines = [f"Options of strategy {name} (-o KEY=VALUE):"]
    for d in describe(cls.Config):
        default = f" (default {d.default})" if d.default else ""
        lines.append(f"{d.name}: {d.type}{default}. {d.doc}")
    return "\n\n".join(escape(line) for line in lines)


def _show_strategy_options(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    # Eager, so it runs before --help: `fedge train --strategy X --help` lists X's options after the flags.
    if value and not ctx.resilient_parsing and value in Registry(Kind.STRATEGY).names():
        try:
            ctx.command.epilog = strategy_help(value)
        except FedgeError:
            pass  # the command itself reports a broken strategy in one line
    return value


@config_options(
    TrainConfig,
    exclude=("strategy", "strategy_options", "model_options", "dataset_options", "fault_at"),
    short={"timeout_s": "--timeout", "rdzv_timeout_s": "--rdzv-timeout", "rdzv_last_call_s": "--rdzv-last-call"},
)
def train(
    config_file: Annotated[Path | None, typer.Argument(help="TOML file of settings; flags override it.")] = None,
    strategy: Annotated[str | None, typer.Option("--strategy", "-s", help=f"{_HELP['strategy']} With --help: its options.", is_eager=True, callback=_show_strategy_options, rich_help_panel=_PANEL_STRATEGY)] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="A strategy Config field, KEY=VALUE (repeatable; see --strategy NAME --help).", rich_help_panel=_PANEL_STRATEGY)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Shortcut for -o lr=LR (every strategy has it).", rich_help_panel=_PANEL_STRATEGY)] = None,
    fault_at: Annotated[str | None, typer.Option("--fault-at", help=_HELP["fault_at"], hidden=True)] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory from its last checkpoint.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/train-<timestamp>/).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out (kept until the new one succeeds).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
    sync: Annotated[bool | None, typer.Option("--sync/--async", hidden=True)] = None,
    lr_scaling: Annotated[str | None, typer.Option("--lr-scaling", hidden=True)] = None,
    warmup_steps: Annotated[str | None, typer.Option("--warmup-steps", hidden=True)] = None,
    *,
    settings: dict[str, Any],
) -> int:
    """Train one model across processes (and machines) with a strategy, launched by torchrun."""
    for name, value in (("sync", sync), ("lr_scaling", lr_scaling), ("warmup_steps", warmup_steps)):
        if value is not None:
            raise ConfigError(_GONE[name])
    strategy_flags = {"lr": lr, **parse_options(option or [])}
    flags = {**settings, "strategy": strategy, "fault_at": fault_at}
    flags["strategy_options"] = {k: v for k, v in strategy_flags.items() if v is not None}
    base = _base_settings(config_file, resume, out, strategy)
    cfg = build_config(base, {k: v for k, v in flags.items() if v is not None})
    _check_before_start(cfg, last_call_given="rdzv_last_call_s" in settings)
    joins = resume is None and not overwrite and _joins_shared_run(out, cfg)
    with RunDir.create("train", resume or out, resume=resume is not None or joins, overwrite=overwrite, resumable=True) as run:
        run.write_config(to_mapping(cfg))
        typer.echo(f"fedge train: {cfg.strategy} on {cfg.nnodes} x {cfg.nproc} processes -> {run.path}", err=True)
        _launch(cfg, run)
    _report(run, as_json)
    return 0


def _joins_shared_run(out: Path | None, cfg: TrainConfig) -> bool:
    """Whether ``out`` is the run directory another node of this same multi-node job already made (nodes that
    checkpoint share one directory): same rendezvous, not finished, same settings but for the per-node ones.
    Every node then writes into it. The same rendezvous with other settings is another job: refused."""
    if out is None or not cfg.rdzv_endpoint or run_kind(out) != "train" or (out / "summary.json").exists():
        return False
    try:
        theirs = to_mapping(from_mapping(TrainConfig, load_toml(out / "config.toml")))
    except FedgeError:
        return False
    if (theirs["rdzv_endpoint"], theirs["rdzv_id"]) != (cfg.rdzv_endpoint, cfg.rdzv_id):
        return False
    mine = to_mapping(cfg)
    diff = sorted(k for k in mine.keys() | theirs.keys() if k not in NODE_SETTINGS and mine.get(k) != theirs.get(k))
    if diff:
        shown = "; ".join(f"{k} is {theirs.get(k)!r} there but {mine.get(k)!r} here" for k in diff[:3])
        raise ConfigError(
            f"--out {str(out)!r} holds an unfinished train run of rendezvous {cfg.rdzv_endpoint} (id {cfg.rdzv_id!r}) "
            f"started with other settings ({shown}); a node joins it only with the same settings: give those, "
            "or another --out, or --overwrite to replace it"
        )
    return True


def _base_settings(config_file: Path | None, resume: Path | None, out: Path | None, strategy: str | None) -> dict[str, Any]:
    """The settings flags are laid over: a resumed run's own config, then the TOML file."""
    base: dict[str, Any] = {}
    if resume is not None:
        base = _resumed_settings(resume, out)
    if config_file is not None:
        base = merge(base, load_toml(config_file))
    if strategy is not None and base.get("strategy") not in (None, strategy):
        base = {k: v for k, v in base.items() if k != "strategy_options"}  # another strategy's options do not apply
    return base


def _resumed_settings(resume: Path, out: Path | None) -> dict[str, Any]:
    held = run_kind(resume)
    if held is None:
        raise ConfigError(f"--resume {str(resume)!r}: nothing to resume there (it holds no run); start a run with --out")
    if held not in ("train", "unknown"):
        raise ConfigError(
            f"--resume {str(resume)!r}: it holds a {held} run, not a train run; resume it with fedge's {held} command"
        )
    if not (resume / "config.toml").is_file():
        raise ConfigError(f"--resume {str(resume)!r}: not a fedge train run directory (no config.toml)")
    if not (resume / "checkpoints" / "latest.json").is_file():
        raise ConfigError(
            f"--resume {str(resume)!r}: the run has no checkpoint yet (it was started without --checkpoint-every, "
            "or stopped before the first); start it again instead"
        )
    if out is not None and out.resolve() != resume.resolve():
        raise ConfigError("--resume continues in the run's own directory; leave --out out")
    return load_toml(resume / "config.toml")


def _check_before_start(cfg: TrainConfig, *, last_call_given: bool) -> None:
    """Fail before any process starts: unknown plugins, bad options, a world size or backend that cannot work."""
    from fedge.plugins.data import dataset_config
    from fedge.plugins.train.base import resolve_strategy, strategy_config

    for kind, name in ((Kind.DATASET, cfg.dataset), (Kind.MODEL, cfg.model)):
        names = Registry(kind).names()
        if name not in names:
            raise PluginNotFoundError(f"unknown {kind} {name!r}; valid: {', '.join(names) or 'none installed'}")
    data = _check_data(cfg, dataset_config(cfg.dataset, cfg.dataset_options, command="fedge train"))
    cls = resolve_strategy(cfg.strategy)
    scfg = strategy_config(cls, cfg.strategy_options, cfg.strategy)
    if scfg.freeze or scfg.recompute:
        _check_blocks(cfg, scfg, data)
    lo, hi = parse_nnodes(cfg.nnodes)
    for nodes in range(lo, hi + 1):
        cls.check_world_size(scfg, nodes * cfg.nproc, cfg.batch_size)
    if last_call_given and lo == hi:
        logger.warning("--rdzv-last-call has no effect: only an elastic --nnodes MIN:MAX waits for more nodes")
    if cfg.backend == "nccl":
        _check_gpus(cfg.nproc)
    elif cfg.device == "cuda":
        _check_gpus(1, flag="--device cuda")


def _check_blocks(cfg: TrainConfig, scfg: Any, data: Any) -> None:
    """``freeze`` and ``recompute`` name blocks of the model: check them against it before anything starts."""
    from fedge.plugins.models import build_model
    from fedge.plugins.train.blocks import BlockControl

    options = {"seed": cfg.seed, **cfg.model_options}
    model = build_model(cfg.model, options, input_shape=data.input_shape, num_classes=data.num_classes)
    BlockControl(model, freeze=scfg.freeze, recompute=scfg.recompute)


def _check_data(cfg: TrainConfig, dataset_cfg: Any) -> Any:
    """Read the training set once here, so a missing or malformed file, or a batch larger than the set, is one
    line before the run directory is made (every rank reads it again)."""
    from fedge.plugins.data import load_dataset

    for f in dataclasses.fields(dataset_cfg):
        value = getattr(dataset_cfg, f.name)
        if isinstance(value, Path) and not value.exists():
            raise ConfigError(
                f"dataset {cfg.dataset}: {f.name} {str(value)!r} does not exist; set [dataset_options] {f.name} to an "
                "existing file or folder"
            )
    data = load_dataset(cfg.dataset, cfg.dataset_options)
    n = len(data.x_train)
    if cfg.batch_size > n:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training set of {cfg.dataset} ({n} samples); "
            f"use at most {n}"
        )
    return data


def _check_gpus(nproc: int, *, flag: str = "--backend nccl") -> None:
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < nproc:
        seen = "no CUDA GPU" if not found else f"{found} CUDA GPU{'s' if found > 1 else ''}"
        need = "one CUDA GPU per process (--nproc {nproc})" if flag == "--backend nccl" else "a CUDA GPU"
        fix = "use --backend gloo (or auto), or lower --nproc" if flag == "--backend nccl" else "use --device cpu (or auto)"
        raise ConfigError(f"{flag} needs {need.format(nproc=nproc)}, but torch {torch.__version__} sees {seen} here; {fix}")


def _launch(cfg: TrainConfig, run: RunDir) -> None:
    from fedge.plugins.train.launcher import launch, node_file
    from fedge.plugins.train.progress import TrainProgress

    node_path = None
    if cfg.rdzv_endpoint:
        node_path = node_file(run)
        node_path.unlink(missing_ok=True)  # from an earlier launch in this directory
        lo, hi = parse_nnodes(cfg.nnodes)
        typer.echo(f"fedge train: {_waiting_line(cfg, lo, hi)}", err=True)
    with TrainProgress(None if cfg.epochs else cfg.steps, node_path) as progress:
        try:
            launch(cfg, run, on_progress=progress.update)
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_line(cfg, run, progress.last_step)) from None


def _interrupted_line(cfg: TrainConfig, run: RunDir, last_step: int) -> str:
    from fedge.plugins.train.checkpoint import latest

    try:
        meta = latest(run.path)
    except FedgeError:
        meta = None
    of = f" of {cfg.steps}" if not cfg.epochs else ""
    if run.replacing:
        return f"interrupted after step {last_step}{of}; the new run was discarded and the run it was to replace is back in {run.path}"
    if meta is None:
        return (
            f"interrupted after step {last_step}{of}; kept {run.path} (no checkpoint: it cannot be resumed; "
            "start again with --checkpoint-every N to make a run resumable)"
        )
    return (
        f"interrupted after step {last_step}{of}; kept {run.path} with its checkpoint after step {meta['step']}; "
        f"resume with: fedge train --resume {run.path}"
    )


def _report(run: RunDir, as_json: bool) -> None:
    from fedge.plugins.train.launcher import node_file
    from fedge.plugins.train.progress import read_node

    summary_file = run.file("summary.json")
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    node = read_node(node_file(run))
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


def _waiting_line(cfg: TrainConfig, lo: int, hi: int) -> str:
    """What this node waits for before training starts (the first node otherwise looks stuck)."""
    at = f"at {cfg.rdzv_endpoint} (rendezvous id {cfg.rdzv_id}, up to {cfg.rdzv_timeout_s:g}s)"
    if lo == hi:
        return f"waiting for {hi} node{'s' if hi > 1 else ''} {at}"
    return (
        f"waiting for {lo} to {hi} nodes {at}; training starts when {hi} have joined, or "
        f"{cfg.rdzv_last_call_s:g}s (--rdzv-last-call) after {lo} have"
    )
