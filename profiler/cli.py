"""``fedge profile``: communication vs computation, per rank, from torch.profiler traces.

Run ``fedge profile report TRACE_DIR`` (or a single ``.json``/``.json.gz`` file).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from fedge.errors import ConfigError, DataError
from fedge.profiler.kinds import Mode

__all__ = ["app"]

app = typer.Typer(
    name="profile",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_MODES = tuple(m.value for m in Mode)


@contextmanager
def _writing(option: str, target: str) -> Iterator[None]:
    """Turn a failed write of an output the user named into one line naming the option to change."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"{option} {target}: cannot write ({err.strerror or err}); give a writable path") from err


@app.callback()
def _group() -> None:
    """Analyse torch.profiler traces: computation vs communication per rank, collectives, stragglers."""


@app.command("report", no_args_is_help=True)
def report(
    path: Annotated[str, typer.Argument(help="A trace file (.json/.json.gz) or a directory of per-rank trace files.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema in docs/profiler.md).")] = False,
    html_file: Annotated[str | None, typer.Option("--html", help="Also write a self-contained HTML report to FILE.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="Definitions: fedge (default) or hta (reproduces HTA 0.5.0).")] = "fedge",
    out: Annotated[str | None, typer.Option("--out", help="Also write config.toml, report.json and report.html to DIR.")] = None,
    include_last_step: Annotated[
        bool, typer.Option("--include-last-step", help="Keep the last ProfilerStep (dropped by default, as HTA does).")
    ] = False,
    top: Annotated[int, typer.Option("--top", help="Kernels listed per rank, by total time.")] = 10,
) -> int:
    """Report computation, communication (hidden and exposed), idle time, collectives and stragglers per rank.

    Exit code 0: every file read; 2: some files could not be read (the report covers the others); 1: nothing read.
    """
    if mode not in _MODES:
        raise ConfigError(f"unknown --mode {mode!r}; valid: {', '.join(_MODES)}")
    if top < 0:
        raise ConfigError(f"--top must be >= 0, got {top}")
    from fedge.profiler.report import build_report, render_html, render_terminal
    from fedge.profiler.trace import load_job

    job = load_job(path)
    if not job.traces:
        first = job.errors[0].message if job.errors else "no trace files"
        more = f" (and {len(job.errors) - 1} more unreadable files)" if len(job.errors) > 1 else ""
        raise DataError(f"no trace could be read: {first}{more}")
    result = build_report(job, mode=mode, include_last_step=include_last_step, top=top)
    page = render_html(result) if html_file or out else None
    if html_file:
        from fedge.rundir import atomic_write_text

        with _writing("--html", html_file):
            atomic_write_text(html_file, page or "")
    if out:
        from fedge.rundir import RunDir

        with _writing("--out", out):
            run = RunDir.create("profile", out)
            run.write_config({"path": str(path), "mode": mode, "include_last_step": include_last_step, "top": top})
            run.write_json("report.json", result)
            run.write_text("report.html", page or "")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_terminal(result)
    for err in job.errors:
        print(f"fedge: warning: skipped unreadable trace: {err.message}", file=sys.stderr)
    return 2 if job.errors else 0
