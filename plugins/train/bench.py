"""``fedge bench``: fedge's collectives and strategies against PyTorch's own, as ratios measured in one run.

Example::

    fedge bench collectives --nproc 2 --json
    fedge bench strategies --nproc 2
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.errors import ConfigError, Interrupted
from fedge.rundir import RunDir

__all__ = ["app", "parse_size", "run_bench", "strategies_spec"]

app = typer.Typer(
    name="bench",
    no_args_is_help=True,
    help="Benchmarks: fedge's collectives and strategies against the backend's and DDP, in one run.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_SIZES = "4KB,16KB,64KB,256KB,1MB,4MB,16MB,64MB"
_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def parse_size(text: str) -> int:
    """``"4KB"`` -> 4096, ``"64MB"`` -> 67108864 (binary units); a multiple of 4 bytes (float32)."""
    t = text.strip().upper()
    unit = next((u for u in ("KB", "MB", "GB", "B") if t.endswith(u)), "B")
    number = t.removesuffix(unit)
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise ConfigError(f"bad size {text!r}; use e.g. 4KB, 256KB, 64MB") from None
    if size < 4 or size % 4:
        raise ConfigError(f"size {text!r} must be a positive multiple of 4 bytes (float32 elements)")
    return size


def _check_nproc(nproc: int) -> None:
    if nproc < 2:
        raise ConfigError(f"--nproc must be >= 2 (one process has nothing to exchange), got {nproc}")


def run_bench(
    what: str,
    nproc: int,
    spec: dict[str, Any],
    out: Path | None = None,
    *,
    show: Callable[[list[dict[str, Any]]], None] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run the bench worker (``collectives`` or ``strategies``) on ``nproc`` processes; rank 0's result rows.

    On Ctrl-C or SIGTERM, ``show`` gets the rows measured so far, then :class:`~fedge.errors.Interrupted` is raised.
    """
    from fedge.plugins.train.config import TrainConfig
    from fedge.plugins.train.launcher import launch

    _check_nproc(nproc)
    with (
        tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp,
        RunDir.create("bench", out, overwrite=overwrite) if out is not None else RunDir(tmp) as run,
    ):
        run.write_json("bench.json", {"what": what, **spec})
        try:
            launch(TrainConfig(nproc=nproc), run, module="fedge.plugins.train.bench_worker")
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_line(run, spec, show, kept=out is not None)) from None
        return list(json.loads(run.file("results.json").read_text(encoding="utf-8")))


def _interrupted_line(
    run: RunDir, spec: dict[str, Any], show: Callable[[list[dict[str, Any]]], None] | None, *, kept: bool
) -> str:
    try:
        partial = json.loads(run.file("partial.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        partial = None
    if not partial or not partial.get("rows"):
        return "interrupted before the first measurement finished; nothing measured"
    if show is not None:
        show(partial["rows"])
    where = f"; kept them in {run.file('partial.json')}" if kept else ""
    return (
        f"interrupted: printed the {len(partial['rows'])} rows measured so far "
        f"(medians of {partial['reps_done']} of {spec['reps']} repetitions){where}"
    )


def _at_least_one(flag: str, value: int, least: int = 1) -> int:
    """A repetition count below ``least`` cannot be timed: say so and use ``least``."""
    if value < least:
        typer.echo(f"fedge bench: warning: {flag} {value} is below {least}; using {flag} {least}", err=True)
        return least
    return value


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*[title for _, title, _ in columns], box=None)
    for row in rows:
        table.add_row(*[format(row[key], fmt) for key, _, fmt in columns])
    Console().print(table)


def _human(size: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}B"


@app.command()
def collectives(
    nproc: Annotated[int, typer.Option("--nproc", help="Processes (gloo, this machine).")] = 2,
    sizes: Annotated[str, typer.Option("--sizes", help="Comma-separated buffer sizes.")] = DEFAULT_SIZES,
    reps: Annotated[int, typer.Option("--reps", help="Interleaved repetitions; the median is reported.")] = 5,
    max_iters: Annotated[int, typer.Option("--max-iters", help="Most calls timed per repetition (small sizes).")] = 50,
    ring_chunk: Annotated[str, typer.Option("--ring-chunk", help="ring-allreduce pipeline chunk.")] = "4MB",
    tree_chunk: Annotated[str, typer.Option("--tree-chunk", help="tree-allreduce pipeline chunk.")] = "1MB",
    out: Annotated[Path | None, typer.Option("--out", help="Keep bench.json and results.json in this directory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the bench run already in --out, whole.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {impl, bytes, algbw_gbps, busbw_gbps, ratio_to_native}.")] = False,
) -> int:
    """algbw/busbw of native all_reduce vs ring vs tree vs parameter-server exchange, 4 KB .. 64 MB."""
    spec = {
        "sizes": [parse_size(s) for s in sizes.split(",") if s.strip()],
        "reps": _at_least_one("--reps", reps),
        "max_iters": _at_least_one("--max-iters", max_iters, 2),
        "ring_chunk_bytes": parse_size(ring_chunk),
        "tree_chunk_bytes": parse_size(tree_chunk),
    }
    show = _show_collectives_json if as_json else _show_collectives
    show(run_bench("collectives", nproc, spec, out, show=show, overwrite=overwrite))
    return 0


def _show_collectives_json(rows: list[dict[str, Any]]) -> None:
    keys = ("impl", "bytes", "algbw_gbps", "busbw_gbps", "ratio_to_native")
    typer.echo(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))


def _show_collectives(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        r["size"] = _human(r["bytes"])
    _table(
        rows,
        [("size", "size", ""), ("impl", "impl", ""), ("time_us", "time (us)", ".1f"),
         ("algbw_gbps", "algbw (GB/s)", ".3f"), ("busbw_gbps", "busbw (GB/s)", ".3f"),
         ("ratio_to_native", "x native", ".2f")],
    )  # fmt: skip


def _timed_strategies(nproc: int, batch_size: int, bucket_mb: float, *, parity: bool = False) -> dict[str, dict[str, Any]]:
    """``{name: options}`` of every registered data-parallel strategy to time: its default settings, as ``fedge
    train`` runs it (``parity``: its first synchronous parity setting instead, e.g. ring's 256-byte chunks that
    exercise chunking). One that cannot take this batch on ``nproc`` processes is left out with a note, so every
    row times the same global batch; strategies that split the model (their parity settings name another
    model) are timed by their own benchmarks."""
    import dataclasses

    from fedge.plugins.train.base import resolve_strategy, strategy_config, strategy_registry

    timed: dict[str, dict[str, Any]] = {}
    for name in strategy_registry().names():
        cls = resolve_strategy(name)
        case = next((c for c in cls.parity_cases.values() if c.model == "mlp"), None)
        if case is None:
            continue
        options = dict(case.options) if parity else {}
        if "bucket_mb" in {f.name for f in dataclasses.fields(cls.Config)}:
            options["bucket_mb"] = bucket_mb  # the bucket size DDP gets too
        try:
            cls.check_world_size(strategy_config(cls, options, name), nproc, batch_size)
        except ConfigError as err:
            typer.echo(f"fedge bench: {name} left out: {err}", err=True)
            continue
        timed[name] = options
    return timed


def strategies_spec(
    nproc: int,
    *,
    model: str,
    model_options: dict[str, Any],
    batch_size: int,
    reps: int,
    iters: int,
    bucket_mb: float,
    built: object = None,
    parity: bool = False,
) -> dict[str, Any]:
    """What the bench worker needs to time every data-parallel strategy on ``model`` (checked here, before any
    process starts; ``built``: the model already built from these options, so it is not built again)."""
    from fedge.plugins.models import build_model

    _check_nproc(nproc)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if batch_size % nproc:
        raise ConfigError(f"--batch-size {batch_size} must be divisible by --nproc {nproc}")
    if not bucket_mb > 0:  # else every worker fails, and their train.log goes with the temporary directory
        raise ConfigError(f"--bucket-mb must be > 0 MiB, got {bucket_mb:g}")
    try:
        if built is None:
            build_model(model, model_options, input_shape=(1, 8, 8), num_classes=10)  # the bench's digits-shaped input
    except ValueError as err:
        raise ConfigError(f"model {model}: {err}") from err
    return {
        "model": model, "model_options": model_options, "batch_size": batch_size, "bucket_mb": bucket_mb,
        "reps": _at_least_one("--reps", reps), "iters": _at_least_one("--iters", iters),
        "strategies": _timed_strategies(nproc, batch_size, bucket_mb, parity=parity),
    }  # fmt: skip


@app.command()
def strategies(
    nproc: Annotated[int, typer.Option("--nproc", help="Processes (gloo, this machine).")] = 2,
    hidden: Annotated[str, typer.Option("--hidden", help="MLP hidden widths (the model whose gradients travel).")] = "1024,1024",
    model: Annotated[str, typer.Option("--model", help="Model plugin timed (digits-shaped 1x8x8 input, 10 classes).")] = "mlp",
    model_option: Annotated[list[str] | None, typer.Option("--model-option", "-m", help="A model Config field, KEY=VALUE (repeatable); --hidden is mlp's hidden.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size.")] = 64,
    reps: Annotated[int, typer.Option("--reps", help="Interleaved repetitions; the median is reported.")] = 7,
    iters: Annotated[int, typer.Option("--iters", help="Steps timed per repetition.")] = 10,
    bucket_mb: Annotated[float, typer.Option("--bucket-mb", help="Bucket size of DDP and of allreduce.")] = 25.0,
    parity_settings: Annotated[bool, typer.Option("--parity-settings", help="Time each strategy at its parity-test setting (e.g. ring's 256-byte chunks) instead of its defaults.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Keep bench.json and results.json in this directory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the bench run already in --out, whole.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {impl, step_ms, samples_per_s, throughput_vs_ddp}.")] = False,
) -> int:
    """Step time of each installed data-parallel strategy (its default, synchronous settings) against DDP.

    Every row does the same work per step on the same --nproc processes: one
    SGD step on the same global batch, the update of single-process training.
    parameter-server runs mode=sync with one server, so --nproc - 1 workers
    share the batch and its ratio includes the process given to serving. A
    strategy that cannot take the batch on --nproc processes is left out with
    a note; strategies that split the model have their own benchmarks.

    Async mode is not timed: a step there is one worker's push, applied on
    arrival to weights up to staleness steps old, not a global-batch SGD step,
    so a ratio to DDP would compare different training. Judge it by time to
    accuracy with fedge train -o mode=async instead.
    """
    from fedge.plugins.train.cli import parse_options

    try:
        widths = [int(h) for h in hidden.split(",") if h.strip()]
    except ValueError:
        raise ConfigError(f"--hidden takes comma-separated integers, got {hidden!r}") from None
    options = ({"hidden": widths} if model == "mlp" else {}) | parse_options(model_option or [], flag="--model-option")
    spec = strategies_spec(
        nproc, model=model, model_options=options, batch_size=batch_size, reps=reps, iters=iters, bucket_mb=bucket_mb,
        parity=parity_settings,
    )  # fmt: skip
    show = _show_json if as_json else _show_strategies
    show(run_bench("strategies", nproc, spec, out, show=show, overwrite=overwrite))
    return 0


def _show_json(rows: list[dict[str, Any]]) -> None:
    typer.echo(json.dumps(rows, indent=2))


def _show_strategies(rows: list[dict[str, Any]]) -> None:
    _table(
        rows,
        [("impl", "impl", ""), ("step_ms", "step (ms)", ".2f"), ("samples_per_s", "samples/s", ".0f"),
         ("throughput_vs_ddp", "x ddp", ".3f")],
    )  # fmt: skip
