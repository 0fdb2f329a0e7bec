"""``fedge profile``: communication vs computation, per rank, from torch.profiler traces.

Run ``fedge profile report TRACE_DIR`` (or a single ``.json``/``.json.gz`` file).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.errors import ConfigError, DataError, Interrupted, StorageError
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
        cause = err.strerror or getattr(err.__cause__, "strerror", None)
        if cause is None and isinstance(err, StorageError):  # already one line naming the path and what to do
            raise
        raise ConfigError(f"{option} {target}: cannot write ({cause or err}); give a writable path") from err


def _options(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``-o stragglers.min_delay_us=20`` -> ``{"stragglers": {"min_delay_us": "20"}}``."""
    out: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name, dot, setting = key.strip().partition(".")
        if not (sep and dot and name and setting):
            raise ConfigError(f"-o expects ANALYSIS.SETTING=VALUE (e.g. stragglers.min_delay_us=20), got {pair!r}")
        out.setdefault(name, {})[setting] = value.strip()
    return out


@contextmanager
def _interruptible(what: str) -> Iterator[None]:
    """Ctrl-C / SIGTERM as one line."""
    from fedge.supervisor import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while {what}; nothing was written (the traces are only read): run it again") from None


@contextmanager
def _output_dir(out: str | None, overwrite: bool) -> Iterator[Any]:
    """The ``--out`` run directory (None without ``--out``), opened before any work and removed again when
    the command fails before writing it, so a retry is not refused."""
    if out is None:
        yield None
        return
    from fedge.rundir import RunDir

    fresh = not Path(out).exists()
    with _writing("--out", out):
        run = RunDir.create("profile", out, overwrite=overwrite)
    try:
        with run:
            yield run
    except BaseException:
        if fresh and not (Path(out) / "report.json").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _load(path: str) -> Any:
    from fedge.profiler.trace import load_job

    job = load_job(path)
    if not job.traces:
        first = job.errors[0].message if job.errors else "no trace files"
        more = f" (and {len(job.errors) - 1} more unreadable files)" if len(job.errors) > 1 else ""
        raise DataError(f"no trace could be read: {first}{more}")
    return job


def _emit(report: Any, *, as_json: bool, html_file: str | None, run: Any, settings: dict[str, Any]) -> None:
    from fedge.profiler.report import render_html, render_terminal

    page = render_html(report) if html_file or run is not None else ""
    if html_file:
        from fedge.rundir import atomic_write_text

        with _writing("--html", html_file):
            atomic_write_text(html_file, page)
    if run is not None:
        with _writing("--out", str(run.path)):
            run.write_config(settings)
            run.write_text("report.html", page)
            run.write_json("report.json", report.data)
    if as_json:
        typer.echo(json.dumps(report.data, indent=2))
    else:
        render_terminal(report)


@app.callback()
def _group() -> None:
    """Analyse torch.profiler traces: computation vs communication per rank, collectives, stragglers."""


_Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON (schema in docs/profiler.md).")]
_Html = Annotated[str | None, typer.Option("--html", help="Also write a self-contained HTML page to FILE.")]
_ModeOpt = Annotated[str, typer.Option("--mode", help="Definitions: fedge (default), hta (reproduces HTA 0.5.0) or tb-profiler (torch-tb-profiler 0.4.3's distributed view).")]
_Out = Annotated[str | None, typer.Option("--out", help="Also write config.toml, report.json and report.html to DIR.")]
_Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out, whole.")]
_LastStep = Annotated[
    bool, typer.Option("--include-last-step", help="Keep the last ProfilerStep (dropped by default, as HTA does).")
]
_Options = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="An analysis setting, ANALYSIS.SETTING=VALUE (fedge plugins --kind analysis --name NAME lists them)."),
]


def _analyse(paths: list[str], *, mode: str, include_last_step: bool, top: int, option: list[str] | None,
             out: str | None, overwrite: bool, as_json: bool, html_file: str | None) -> int:
    """Check every setting and output, read the traces, run the analyses, write and print the result."""
    if mode not in _MODES:
        raise ConfigError(f"unknown --mode {mode!r}; valid: {', '.join(_MODES)}")
    if top < 0:
        raise ConfigError(f"--top must be >= 0, got {top}")
    from fedge.profiler.report import choose_analyses, run_report
    from fedge.profiler.trace import find_trace_files

    options = _options(option or [])
    common = {"mode": Mode(mode), "include_last_step": include_last_step, "top": top}
    choose_analyses(common, options, inputs=len(paths))  # bad settings: before any work
    for path in paths:
        find_trace_files(path)
    settings = {"paths": [str(p) for p in paths], "mode": mode, "include_last_step": include_last_step, "top": top,
                "options": options}
    with _output_dir(out, overwrite) as run, _interruptible("reading the traces"):
        jobs = [_load(p) for p in paths]
        result = run_report(jobs[-1], baseline=jobs[0] if len(jobs) == 2 else None, mode=mode,
                            include_last_step=include_last_step, top=top, options=options)
        _emit(result, as_json=as_json, html_file=html_file, run=run, settings=settings)
    errors = [e for job in jobs for e in job.errors]
    for err in errors:
        print(f"fedge: warning: skipped unreadable trace: {err.message}", file=sys.stderr)
    return 2 if errors else 0


@app.command("report", no_args_is_help=True)
def report(
    path: Annotated[str, typer.Argument(help="A trace file (.json/.json.gz) or a directory of per-rank trace files.")],
    as_json: _Json = False,
    html_file: _Html = None,
    mode: _ModeOpt = "fedge",
    out: _Out = None,
    overwrite: _Overwrite = False,
    include_last_step: _LastStep = False,
    top: Annotated[int, typer.Option("--top", help="Kernels listed per rank, by total time.")] = 10,
    option: _Options = None,
) -> int:
    """Report computation, communication (hidden and exposed), idle time, collectives and stragglers per rank,
    and what every other installed analysis finds.

    Exit code 0: every file read; 2: some files could not be read (the report covers the others); 1: nothing read.
    """
    return _analyse([path], mode=mode, include_last_step=include_last_step, top=top, option=option, out=out,
                    overwrite=overwrite, as_json=as_json, html_file=html_file)


@app.command("diff", no_args_is_help=True)
def diff(
    baseline: Annotated[str, typer.Argument(help="The run to compare against: a trace file or a directory of per-rank traces.")],
    candidate: Annotated[str, typer.Argument(help="The run to explain: a trace file or a directory of per-rank traces.")],
    as_json: _Json = False,
    html_file: _Html = None,
    mode: _ModeOpt = "fedge",
    out: _Out = None,
    overwrite: _Overwrite = False,
    include_last_step: _LastStep = False,
    option: _Options = None,
) -> int:
    """What changed from BASELINE to CANDIDATE, per rank and overall: time per kind of work, kernel types,
    kernels and collectives, ranked by how much time each gained or lost (new and gone ones marked).

    Two directories are paired rank by rank; two single traces (two ranks of one job, say) are compared as
    they are. Exit code 0: every file read; 2: some files could not be read; 1: a side has no readable trace.
    """
    return _analyse([baseline, candidate], mode=mode, include_last_step=include_last_step, top=10, option=option,
                    out=out, overwrite=overwrite, as_json=as_json, html_file=html_file)
