"""``fedge advise``: which data-parallel strategy will be fastest for a model on W processes of this machine.

It fits an alpha-beta model to ``fedge bench collectives`` at that world size, with each collective's
wake-up after compute and FSDP's per-unit cost (stored and reused: see ``--calibration``), measures the
model's compute per step inside a W-process job, predicts each strategy's step time
(:mod:`fedge.plugins.train.cost_model`), ranks them and says why. ``--check`` then runs ``fedge bench
strategies`` and prints predicted against measured, with the error of each.

Example::

    fedge advise mlp --nproc 2
    fedge advise tiny-gpt --nproc 4 -m d_model=64 --check
    fedge advise cnn --nproc 2 --json --refit
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.errors import ConfigError
from fedge.rundir import RunDir, atomic_write_text

__all__ = ["advise", "calibrate", "compute_spec", "measure_compute"]

CALIBRATION_SIZES = "4KB,16KB,64KB,256KB,1MB,4MB,16MB"
_INPUT_SHAPE, _CLASSES = (1, 8, 8), 10  # the benches' digits-shaped input


def _default_calibration(nproc: int, sizes: str, reps: int) -> Path:
    # Other --sizes/--reps get a file of their own, so measuring them never replaces the default calibration.
    tag = "" if (sizes, reps) == (CALIBRATION_SIZES, 5) else "-" + hashlib.sha1(f"{sizes}|{reps}".encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "fedge" / f"collectives-{socket.gethostname()}-w{nproc}{tag}.json"


_FSDP_SHAPES = [[2, 64], [6, 64], [2, 512]]  # (Linear layers, width): units and bytes apart
_METHOD = 2  # how the calibration is measured; one stored by another method is measured again


def _stored(path: Path, *, nproc: int, sizes: list[int], reps: int) -> dict[str, Any] | None:
    """The calibration in ``path`` if it was measured here, at ``nproc`` processes, ``sizes`` and ``reps``."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"calibration {str(path)!r} is not a fedge collectives calibration ({err}); pass --refit to measure again"
        ) from err
    if not (isinstance(stored, dict) and isinstance(stored.get("rows"), list)):
        raise ConfigError(
            f"calibration {str(path)!r} is not a fedge collectives calibration (no rows of measurements); "
            "pass --refit to measure again"
        )
    wanted = {"world_size": nproc, "host": socket.gethostname(), "sizes": sizes, "reps": reps, "method": _METHOD}
    if all(stored.get(k) == v for k, v in wanted.items()) and isinstance(stored.get("fsdp_rows"), list):
        return dict(stored)
    return None


def calibrate(
    nproc: int, path: Path, *, refit: bool, sizes: str = CALIBRATION_SIZES, reps: int = 5, compute: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The collectives measurement at ``nproc`` processes: read from ``path`` when it was made here at that
    world size with these ``sizes`` and ``reps`` (and not ``refit``), else measured with ``fedge bench
    collectives`` (plus each collective's wake-up after compute and FSDP's per-unit cost) and stored there.

    When it is measured, the same processes also measure ``compute`` (a :func:`compute_spec`) and its seconds
    come back second; otherwise None."""
    from fedge.plugins.train.bench import parse_size, run_bench

    if path.is_dir():
        raise ConfigError(f"--calibration {str(path)!r} is a directory; give a file path (e.g. {path / 'collectives.json'})")
    size_list = [parse_size(s) for s in sizes.split(",") if s.strip()]
    if path.is_file() and not refit:
        stored = _stored(path, nproc=nproc, sizes=size_list, reps=reps)
        if stored is not None:
            return stored, None
        typer.echo(
            f"fedge advise: {path} was measured on another host, world size, --sizes or --reps (or by an older "
            "fedge); it is measured again and replaced", err=True,
        )  # fmt: skip
    typer.echo(f"fedge advise: measuring collectives on {nproc} processes (stored in {path}) ...", err=True)
    spec = {
        "sizes": size_list, "reps": reps, "max_iters": 100, "wake_iters": 60, "after_compute": True,
        "ring_chunk_bytes": 4 << 20, "tree_chunk_bytes": 1 << 20, "fsdp_shapes": _FSDP_SHAPES,
        **({"compute": compute} if compute else {}),
    }  # fmt: skip
    rows = run_bench("collectives", nproc, spec)
    kind: dict[str, list[dict[str, Any]]] = {"fsdp": [], "compute": [], "": []}
    for row in rows:
        kind.setdefault(row.get("kind", ""), []).append(row)
    record = {
        "world_size": nproc, "host": socket.gethostname(), "sizes": size_list, "reps": reps, "method": _METHOD,
        "measured_at": time.time(), "rows": kind[""], "fsdp_rows": kind["fsdp"],
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record, ({r["case"]: r["compute_s"] for r in kind["compute"]} if compute else None)


def compute_spec(model: str, options: dict[str, Any], *, nproc: int, batch_size: int, iters: int = 60) -> dict[str, Any]:
    """What the bench worker needs to time the model's compute on ``nproc`` processes (see :func:`measure_compute`)."""
    cases = [{"name": "dp", "rows": batch_size // nproc, "ranks": nproc}]
    if batch_size % (nproc - 1) == 0:
        cases.append({"name": "ps", "rows": batch_size // (nproc - 1), "ranks": nproc - 1})
    return {"model": model, "model_options": options, "cases": cases, "warmup": 5, "iters": iters, "reps": 1}


def measure_compute(spec: dict[str, Any], *, nproc: int) -> dict[str, float]:
    """Seconds of one forward + backward + SGD step on each rank's rows, all ``nproc`` ranks computing at once
    (a W-process job, no communication; the slowest rank per step): ``"dp"`` on B/W rows, and ``"ps"`` on
    B/(W-1) rows with W - 1 ranks computing (the parameter server's workers) when the batch splits so."""
    from fedge.plugins.train.bench import run_bench

    typer.echo(f"fedge advise: measuring {spec['model']}'s compute on {nproc} processes ...", err=True)
    return {r["case"]: r["compute_s"] for r in run_bench("compute", nproc, spec)}


def _build(model: str, options: dict[str, Any]) -> Any:
    from fedge.plugins.models import build_model

    try:
        return build_model(model, options, input_shape=_INPUT_SHAPE, num_classes=_CLASSES)
    except ValueError as err:
        raise ConfigError(f"model {model}: {err}") from err


def _model_facts(net: Any) -> tuple[float, int]:
    """(gradient bytes, FSDP units) of the model."""
    from fedge.plugins.train.blocks import model_blocks

    grad_bytes = float(sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad))
    return grad_bytes, len(model_blocks(net)) + 1


def _warn_if_busy() -> None:
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    if load > cores:
        typer.echo(
            f"fedge advise: warning: this machine is busy (load average {load:.1f} on {cores} cores); other "
            "processes delay every measurement, so predictions and measurements may be far apart", err=True,
        )  # fmt: skip


def _predictions(
    facts: tuple[float, int], compute: dict[str, float], nproc: int, record: dict[str, Any]
) -> list[Any]:
    from fedge.plugins.train.cost_model import fit_collectives, fit_per_unit, predict, rank

    fits = fit_collectives(record["rows"])
    wake = {str(r["impl"]): float(r.get("wake_us", 0.0)) / 1e6 for r in record["rows"]}
    fsdp = fit_per_unit((r["units"], r["bytes"], r["extra_s"]) for r in record["fsdp_rows"] if r["extra_s"] > 0)
    grad_bytes, units = facts
    return rank(predict(fits, grad_bytes=grad_bytes, num_units=units, compute_s=compute, world_size=nproc,
                        wake_s=wake, fsdp=fsdp))  # fmt: skip


def _check(spec: dict[str, Any], nproc: int, predictions: list[Any]) -> list[dict[str, Any]]:
    """Measured step of every predicted strategy (``fedge bench strategies``), and the prediction's error."""
    from fedge.plugins.train.bench import run_bench

    spec = dict(spec)  # every strategy at its default settings, as predicted (and as fedge train runs it)
    spec["strategies"] = {k: v for k, v in spec["strategies"].items() if k in {p.strategy for p in predictions}}
    typer.echo(f"fedge advise: measuring {', '.join(spec['strategies'])} with fedge bench strategies ...", err=True)
    measured = {r["impl"]: r["step_ms"] / 1e3 for r in run_bench("strategies", nproc, spec)}
    return _check_rows(predictions, measured)


def _check_rows(predictions: list[Any], measured: dict[str, float]) -> list[dict[str, Any]]:
    """Predicted against measured seconds per strategy; the error is relative to the measured step."""
    rows = []
    for p in predictions:
        if p.strategy in measured:
            m = measured[p.strategy]
            rows.append({"strategy": p.strategy, "predicted_ms": p.step_s * 1e3, "measured_ms": m * 1e3, "error_pct": 100 * (p.step_s - m) / m})
    return rows


def _summary(checked: list[dict[str, Any]]) -> dict[str, Any]:
    if not checked:
        return {}
    fastest_measured = min(checked, key=lambda r: r["measured_ms"])["strategy"]
    fastest_predicted = min(checked, key=lambda r: r["predicted_ms"])["strategy"]
    return {
        "fastest_predicted": fastest_predicted, "fastest_measured": fastest_measured,
        "fastest_right": fastest_predicted == fastest_measured,
        "median_abs_error_pct": statistics.median(abs(r["error_pct"]) for r in checked),
    }  # fmt: skip


def _show(result: dict[str, Any]) -> None:
    typer.echo(f"{result['model']} on {result['world_size']} processes, global batch {result['batch_size']} "
               f"({result['grad_bytes'] / 1e6:.2f} MB of gradients), fastest first:")  # fmt: skip
    for i, p in enumerate(result["ranking"], 1):
        typer.echo(f"{i}. {p['strategy']}: {p['step_s'] * 1e3:.2f} ms/step (compute {p['compute_s'] * 1e3:.2f} + "
                   f"comm {p['comm_s'] * 1e3:.2f}); {p['reason']}")  # fmt: skip
    if result.get("check"):
        typer.echo("predicted vs measured (fedge bench strategies):")
        for r in result["check"]:
            typer.echo(f"  {r['strategy']}: predicted {r['predicted_ms']:.2f} ms, measured {r['measured_ms']:.2f} ms, "
                       f"error {r['error_pct']:+.0f}%")  # fmt: skip
        s = result["check_summary"]
        typer.echo(f"fastest: predicted {s['fastest_predicted']}, measured {s['fastest_measured']}; "
                   f"median |error| {s['median_abs_error_pct']:.0f}%")  # fmt: skip


def advise(
    model: Annotated[str, typer.Argument(help="Model plugin (fedge plugins --kind model).")],
    nproc: Annotated[int, typer.Option("--nproc", help="World size: processes on this machine (gloo).")] = 2,
    model_option: Annotated[list[str] | None, typer.Option("--model-option", "-m", help="A model Config field, KEY=VALUE (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size.")] = 64,
    check: Annotated[bool, typer.Option("--check", help="Also run fedge bench strategies and print predicted vs measured.")] = False,
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Where the collectives measurement is stored and reused (default ~/.cache/fedge/collectives-HOST-wN.json).")] = None,
    refit: Annotated[bool, typer.Option("--refit", help="Measure the collectives again instead of reusing --calibration.")] = False,
    sizes: Annotated[str, typer.Option("--sizes", help="Buffer sizes the collectives are measured at (when they are).")] = CALIBRATION_SIZES,
    reps: Annotated[int, typer.Option("--reps", help="Interleaved repetitions of each measurement; medians are used.")] = 5,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/advise-<timestamp>/).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the advise run already in --out, whole.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ranking (and the check) as JSON.")] = False,
) -> int:
    """Predict each data-parallel strategy's step time here from a fitted alpha-beta model, rank them, say why."""
    from fedge.plugins.train.bench import parse_size, strategies_spec
    from fedge.plugins.train.cli import parse_options

    options = parse_options(model_option or [], flag="--model-option")
    if len({parse_size(s) for s in sizes.split(",") if s.strip()}) < 2:
        raise ConfigError(f"--sizes needs two or more sizes for the alpha-beta fit, got {sizes!r}")
    if reps < 1:
        raise ConfigError(f"--reps must be >= 1, got {reps}")
    net = _build(model, options)  # a bad model or option: one line before anything is measured
    facts = _model_facts(net)
    # Checked up front too, so a batch that does not split is one line before the collectives are measured.
    spec = strategies_spec(
        nproc, model=model, model_options=options, batch_size=batch_size, reps=reps, iters=20, bucket_mb=25.0, built=net
    )
    with RunDir.create("advise", out, overwrite=overwrite) as run:  # an --out holding a run: refused before measuring
        wanted = compute_spec(model, options, nproc=nproc, batch_size=batch_size)
        cal = calibration or _default_calibration(nproc, sizes, reps)
        record, compute = calibrate(nproc, cal, refit=refit, sizes=sizes, reps=reps, compute=wanted)
        _warn_if_busy()
        run.write_json("collectives.json", record)
        if compute is None:  # a stored calibration: the compute still needs its own job
            compute = measure_compute(wanted, nproc=nproc)
        ranking = _predictions(facts, compute, nproc, record)
        result: dict[str, Any] = {
            "model": model, "model_options": options, "world_size": nproc, "batch_size": batch_size,
            "grad_bytes": facts[0], "compute_s": compute, "ranking": [dataclasses.asdict(p) for p in ranking],
        }  # fmt: skip
        if check:
            result["check"] = _check(spec, nproc, ranking)
            result["check_summary"] = _summary(result["check"])
        run.write_json("advice.json", result)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _show(result)
    return 0
