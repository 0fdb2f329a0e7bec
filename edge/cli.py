"""``fedge edge``: export a trained model to TFLite for a board (verified on LiteRT and TFLite Micro), make a
smaller one that fits a board, inspect a ``.tflite`` file, list boards.

Run ``fedge edge export runs/fl-XXXX --quantize int8 --target arduino-nano-33-ble-sense``, or
``fedge edge fit runs/fl-XXXX --target xiao-samd21``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.cli.options import config_options
from fedge.config import from_mapping, load_toml, merge
from fedge.edge.fit import FitConfig
from fedge.errors import ConfigError

app = typer.Typer(
    name="edge",
    help="TFLite export for microcontrollers and phones, verified on LiteRT and TensorFlow Lite Micro.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


BoardsOption = Annotated[
    Path | None, typer.Option(help="TOML file with your own \\[boards.NAME] tables (flash_kb, ram_kb, notes).")
]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with these settings (flags win).")]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace the run already in --out (whole, once the new one is written).")
]


def _limit(total_kb: int, reserved_kb: int) -> str:
    if not total_kb:
        return "-"
    return f"{total_kb} KB" + (f" ({total_kb - reserved_kb} KB left by the firmware)" if reserved_kb else "")


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KB ({n:,} B)"


def _print_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rt = r["runtimes"]
    table = Table(show_header=False, box=None)
    table.add_row("model", f"{r['source']} -> {r['quantization']} ({r['exporter']})")
    table.add_row("file", f"{_kb(r['size_bytes'])}, ops: {', '.join(f'{k} x{v}' for k, v in r['ops'].items())}")
    if r["arena_bytes"] is None:
        table.add_row("tensor arena", "- (not run on TFLite Micro)")
    else:
        table.add_row(
            "tensor arena", f"{_kb(r['arena_bytes'])} for TFLite Micro (smallest that ran: {_kb(r['arena_min_bytes'])})"
        )
    table.add_row(
        "accuracy",
        f"source {r['accuracy_source']:.4f}  exported {r['accuracy_exported']:.4f}  "
        f"({r['accuracy_drop_points']:.2f} points lost) on {r['held_out_samples']} held-out {r['dataset']} samples",
    )
    tflm = rt.get("tflm", {})
    if tflm.get("ran"):
        a = rt["agreement"]
        table.add_row(
            "runtimes",
            f"LiteRT and TFLite Micro {'agree' if a['agreed'] else 'DISAGREE'}: same prediction on "
            f"{a['same_predictions']}/{a['samples']}, identical outputs on {a['identical_outputs']}, "
            f"max difference {a['max_abs_diff']:g}; TFLM accuracy {tflm['accuracy']:.4f}",
        )
        if first := a.get("first_difference"):
            if r["quantization"] == "int8":
                why = ": the runtimes round an exact half differently" if first["max_abs_diff"] <= 1 else ""
            else:  # float kernels sum in different orders
                why = ": float rounding" if first["max_abs_diff"] < 1e-3 else ""
            table.add_row(
                "",
                f"outputs first differ at op {first['op_index']} {first['op']} on {first['samples']} samples "
                f"(max {first['max_abs_diff']:g}){why}",
            )
    else:
        table.add_row("runtimes", f"LiteRT ran it; TFLite Micro did not: {tflm.get('reason', '-')}")
    if "board" in r:
        b = r["board"]
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        table.add_row(
            "board",
            f"{b['name']}: {verdict} (flash {_kb(r['size_bytes'])} of {_kb(b['model_flash_bytes'] or None)}, "
            f"arena {_kb(r['arena_bytes'])} of {_kb(b['arena_ram_bytes'] or None)} RAM, after the firmware's share)",
        )
    table.add_row("time", f"convert {r['convert_s']:.1f} s, verify {r['verify_s']:.1f} s")
    table.add_row("written", f"{r['run_dir']}/ {' '.join(r['files'])} edge-report.json")
    Console().print(table)


def _options(pairs: list[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option takes KEY=VALUE (e.g. -o calibration_samples=100), got {pair!r}")
        options[key.strip()] = value.strip()
    return options


@app.command(no_args_is_help=True)
def export(
    model: Annotated[
        Path,
        typer.Argument(
            help="fedge run directory (model.pt + model.json), a .pt beside model.json, a .keras file or a SavedModel directory."
        ),
    ],
    exporter: Annotated[
        str | None,
        typer.Option("--exporter", "-e", help="Exporter plugin (default c-array; see: fedge plugins --kind exporter)."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="An exporter Config field, KEY=VALUE (repeatable), e.g. symbol=g_digits."),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize", "-q", help="none, float16, dynamic or int8 (default int8): -o quantization=... for short."
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="Dataset for calibration and held-out checks when model.json names none (default digits)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", "-t", help="Board to check flash and RAM against (see: fedge edge boards)."),
    ] = None,
    boards: BoardsOption = None,
    config: ConfigOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/edge-<timestamp>).")] = None,
    overwrite: OverwriteOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print edge-report.json instead of the summary.")] = False,
) -> None:
    """Convert a trained model with an exporter (TFLite + C array by default), verify it on LiteRT and TFLite
    Micro, check a board."""
    from fedge.edge.export_workflow import ExportConfig, ExportWorkflow

    raw = load_toml(config) if config else {}
    raw = merge(
        raw,
        {"exporter": exporter, "options": _options(option), "quantize": quantize, "dataset": dataset, "target": target},
    )
    cfg = from_mapping(ExportConfig, raw, where="edge export")
    workflow = ExportWorkflow(model, cfg, out=out, boards=boards, overwrite=overwrite)
    if as_json:
        report = workflow.run()
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console

    with Console(stderr=True).status(f"exporting {model} ({cfg.exporter}): convert, then run on LiteRT/TFLM"):
        report = workflow.run()
    _print_report(report)


def _print_fit_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    b = r["board"]
    teacher = r.get("teacher_accuracy_int8")  # None when the model as it is could not be exported
    console.print(
        f"{r['source']} on {b['name']} ({_kb(b['model_flash_bytes'])} of flash and {_kb(b['arena_ram_bytes'])} of RAM "
        f"left by the firmware); int8 teacher accuracy {'-' if teacher is None else f'{teacher:.4f}'}"
    )
    table = Table("candidate", "params", "flash", "arena", "LiteRT", "TFLM", "drop", "fits", box=None)
    for c in r["candidates"]:
        if not c["exported"]:
            table.add_row(c["name"], f"{c['params']:,}", "", "", "", "", "", f"skipped: {c['reason']}")
            continue
        tflm = "-" if c["accuracy_tflm"] is None else f"{c['accuracy_tflm']:.4f}"
        fits = "yes" if c["fits"] else ("no: " + (c.get("reason") or _misfit(c)))
        table.add_row(
            c["name"],
            f"{c['params']:,}",
            f"{c['size_bytes'] / 1024:.1f} KB",
            f"{c['arena_bytes'] / 1024:.1f} KB" if c["arena_bytes"] is not None else "-",
            f"{c['accuracy']:.4f}",
            tflm,
            "-" if c.get("accuracy_drop_points") is None else f"{c['accuracy_drop_points']:+.2f}",
            fits + (" <- chosen" if c["name"] == r["chosen"] else ""),
        )
    console.print(table)
    if r["fits_as_is"]:
        console.print("the int8 model fits as it is: nothing to search")
    console.print("accuracy: int8, on the held-out samples; drop: points below the int8 teacher")
    console.print(f"written: {r['run_dir']}/ model.tflite model_data.cc model_data.h edge-report.json fit-report.json")


def _misfit(c: dict[str, Any]) -> str:
    return " and ".join(w for w, ok in (("flash", c["flash_ok"]), ("RAM", c["ram_ok"])) if not ok) or "-"


@app.command(no_args_is_help=True)
@config_options(FitConfig, short={"target": "-t"})
def fit(
    model: Annotated[
        Path, typer.Argument(help="fedge run directory (model.pt + model.json), or a .pt beside model.json.")
    ],
    boards: BoardsOption = None,
    config: ConfigOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default runs/edge-fit-<timestamp>).")
    ] = None,
    overwrite: OverwriteOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print fit-report.json instead of the table.")] = False,
    *,
    settings: dict[str, Any],
) -> None:
    """When the int8 model does not fit the board, find the most accurate smaller one that does: low-rank
    factorizations and distilled students, each exported to int8 and verified on LiteRT and TFLite Micro."""
    from fedge.edge.fit import FitWorkflow

    cfg = from_mapping(FitConfig, merge(load_toml(config) if config else {}, settings), where="edge fit")
    if as_json:
        typer.echo(json.dumps(FitWorkflow(model, cfg, out=out, boards=boards, overwrite=overwrite).run(), indent=2))
        return
    from rich.console import Console

    with Console(stderr=True).status(f"fitting {model} to {cfg.target}") as status:
        workflow = FitWorkflow(
            model, cfg, out=out, boards=boards, overwrite=overwrite, progress=lambda line: status.update(line)
        )
        report = workflow.run()
    _print_fit_report(report)


@app.command(no_args_is_help=True)
def inspect(
    file: Annotated[Path, typer.Argument(help="A .tflite file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print ops, tensors and quantization as JSON.")] = False,
) -> None:
    """Ops, tensors, quantization parameters and sizes of a .tflite file, and which ops TFLite Micro lacks."""
    from fedge.edge.convert import load_edge_model

    edge = load_edge_model(file)
    info = edge.info()
    if as_json:
        typer.echo(json.dumps({"quantization": edge.quantization.value, **info.to_json()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"{file}: {_kb(info.size_bytes)}, quantization {edge.quantization.value}")
    console.print("ops: " + ", ".join(f"{k} x{v}" for k, v in info.ops.items()))
    if info.tflm_unsupported:
        console.print(f"TFLite Micro lacks: {', '.join(info.tflm_unsupported)}")
    else:
        console.print(
            "TFLite Micro: every op has a kernel"
            + ("" if edge.quantization.runs_on_tflm else f", but TFLM cannot run {edge.quantization.value} models")
        )
    table = Table("#", "name", "shape", "dtype", "scale", "zero point", "const", box=None)
    for t in info.tensors:
        scale = f"{t.scales[0]:.6g}" + (f" (+{len(t.scales) - 1})" if len(t.scales) > 1 else "") if t.scales else ""
        zero = (
            str(t.zero_points[0]) if t.zero_points and len(t.scales) <= 1 else ("per-channel" if t.zero_points else "")
        )
        name = t.name if len(t.name) <= 60 else "..." + t.name[-57:]
        table.add_row(str(t.index), name, str(t.shape), t.dtype, scale, zero, "yes" if t.is_constant else "")
    console.print(table)


@app.command("boards")
def list_boards(
    boards: Annotated[Path | None, typer.Option(help="TOML file with your own \\[boards.NAME] tables.")] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print a JSON list of {name, flash_kb, ram_kb, reserved_flash_kb, reserved_ram_kb, notes}."
        ),
    ] = False,
) -> None:
    """The boards --target knows: flash, RAM and notes."""
    from fedge.edge.boards import load_boards

    rows = [
        {
            "name": b.name,
            "flash_kb": b.flash_kb,
            "ram_kb": b.ram_kb,
            "reserved_flash_kb": b.reserved_flash_kb,
            "reserved_ram_kb": b.reserved_ram_kb,
            "notes": b.notes,
        }
        for b in load_boards(boards).values()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "flash", "RAM", "notes", box=None)
    for r in rows:
        table.add_row(
            r["name"],
            _limit(r["flash_kb"], r["reserved_flash_kb"]),
            _limit(r["ram_kb"], r["reserved_ram_kb"]),
            r["notes"],
        )
    Console().print(table)


__all__ = ["app"]
