"""The report: every registered analysis (fedge's own and third-party ones alike, found through the
``fedge.analyses`` entry points) run over one job view, assembled into the JSON object documented in
docs/profiler.md (the DESIGN.md contract), and rendered for the terminal or as a standalone HTML page from
the sections each analysis gives.

An analysis's result puts keys at the top of the report (``report_fields``) or per rank into ``ranks``
(``rank_fields``); one that does neither appears under ``analyses.<name>``.
"""

from __future__ import annotations

import dataclasses
import html
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedge.errors import ConfigError, PluginLoadError
from fedge.profiler.analyses.base import AnalysisPlugin, Column, JobView, Result, Section
from fedge.profiler.kinds import Mode
from fedge.profiler.trace import Job
from fedge.registry import Chosen, Kind, Registry

__all__ = ["Report", "analyses", "build_report", "choose_analyses", "render_html", "render_terminal", "run_report"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_OWN_KEYS = frozenset({"schema_version", "mode", "gpu_activity", "ranks", "analyses", "errors", "notes"})


def analyses() -> Registry[AnalysisPlugin]:
    """The installed analyses."""
    return Registry(Kind.ANALYSIS, AnalysisPlugin)


@dataclass(frozen=True, slots=True)
class Report:
    """A finished report: ``data`` is the JSON object; ``sections`` what each analysis shows, in report order."""

    data: dict[str, Any]
    sections: tuple[tuple[str, tuple[Section, ...]], ...]
    title: str = "fedge profile report"


def choose_analyses(
    common: Mapping[str, Any],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    registry: Registry[AnalysisPlugin] | None = None,
    inputs: int = 1,
) -> tuple[list[Chosen[AnalysisPlugin]], list[str]]:
    """Every installed analysis with its validated Config, in report order, and notes for those that failed
    to load.

    Args:
        common: settings offered to every analysis whose Config declares them (``mode``, ``include_last_step``,
            ``top``).
        options: per analysis name, its own settings (``{"stragglers": {"min_delay_us": "20"}}``).
        inputs: 1 for the analyses of one run (the report), 2 for those of two (the diff).

    Raises:
        ConfigError: an option names no installed analysis, or a setting is unknown or invalid (one line).
    """
    registry = registry if registry is not None else analyses()
    options = options or {}
    unknown = sorted(set(options) - set(registry.names()))
    if unknown:
        raise ConfigError(f"no analysis named {unknown[0]!r}; installed: {', '.join(registry.names())}")
    chosen: list[Chosen[AnalysisPlugin]] = []
    notes: list[str] = []
    broken: set[str] = set()
    other_mode: dict[str, str] = {}
    mode = Mode(common.get("mode", Mode.FEDGE))
    for name in registry.names():
        try:
            plugin = registry.get(name)
        except PluginLoadError as err:  # a broken third-party analysis must not take the report down
            notes.append(f"analysis {name!r} not run: {err}")
            broken.add(name)
            continue
        if getattr(plugin, "inputs", 1) != inputs:
            continue
        modes = getattr(plugin, "modes", None)  # an analysis of one mode's definitions (tb-profiler's view)
        if modes is not None and mode not in tuple(Mode(m) for m in modes):
            other_mode[name] = ", ".join(Mode(m).value for m in modes)
            continue
        declared = {f.name for f in dataclasses.fields(plugin.Config)}
        settings = {k: v for k, v in common.items() if k in declared} | dict(options.get(name, {}))
        chosen.append(registry.choose(name, settings, where=f"analysis {name}"))
    elsewhere = sorted(set(options) - {c.name for c in chosen} - broken)
    if elsewhere and elsewhere[0] in other_mode:
        raise ConfigError(f"analysis {elsewhere[0]!r} runs only with --mode {other_mode[elsewhere[0]]}; add it or drop its -o settings")
    if elsewhere:
        other = "fedge profile report" if inputs == 2 else "fedge profile diff"
        raise ConfigError(f"analysis {elsewhere[0]!r} does not run here but in {other}; drop its -o settings")
    chosen.sort(key=lambda c: (getattr(c.plugin, "order", 50), c.name))
    return chosen, notes


def run_report(
    job: Job, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False, top: int = 10,
    options: Mapping[str, Mapping[str, Any]] | None = None, registry: Registry[AnalysisPlugin] | None = None,
    baseline: Job | None = None,
) -> Report:
    """Run every installed analysis over ``job`` and assemble the report (see :func:`build_report`); with a
    ``baseline``, the analyses of two runs instead (``fedge profile diff``), ``job`` being the candidate."""
    before = JobView(baseline, mode=mode, include_last_step=include_last_step) if baseline is not None else None
    view = JobView(job, mode=mode, include_last_step=include_last_step, baseline=before)
    common = {"mode": view.mode, "include_last_step": include_last_step, "top": top}
    chosen, notes = choose_analyses(common, options, registry=registry, inputs=1 if baseline is None else 2)
    ranks: dict[int, dict[str, Any]] = {t.rank: {"rank": t.rank, "file": t.path} for t in job.traces}
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    sections: list[tuple[str, tuple[Section, ...]]] = []
    notes = [n for t in (*(baseline.traces if baseline is not None else ()), *job.traces) for n in t.notes] + notes
    for c in chosen:
        try:
            result = c.plugin.run(view, c.config)
            if not isinstance(result, Result):
                raise TypeError(f"run() returned {type(result).__name__}, not a fedge.profiler Result")
            own, per_rank = result.report_fields(), result.rank_fields()
            shown = tuple(result.sections())
            body = result.to_json() if not (own or per_rank) else None
            notes += result.notes()
        except Exception as err:  # an analysis must not take the report down
            notes.append(f"analysis {c.name!r} failed: {type(err).__name__}: {err}")
            logger.debug("analysis %s failed", c.name, exc_info=True)
            continue
        taken = sorted(set(own) & (_OWN_KEYS | set(fields)))
        if taken:
            notes.append(f"analysis {c.name!r} reports {', '.join(taken)}, already in the report; shown under analyses")
            own, body = {}, result.to_json()
        fields.update(own)
        for rank, values in per_rank.items():
            if rank in ranks:
                ranks[rank].update({k: v for k, v in values.items() if k not in ("rank", "file")})
        if body is not None:
            extra[c.name] = body
        sections.append((c.name, shown))
    data = {
        "schema_version": SCHEMA_VERSION,
        "mode": view.mode.value,
        "gpu_activity": any(t.has_gpu for t in job.traces),
        "ranks": [ranks[r] for r in sorted(ranks)],
        **fields,
        "analyses": extra,
        "errors": [e.to_json() for e in (*(baseline.errors if baseline is not None else ()), *job.errors)],
        "notes": notes,
    }
    return Report(data=data, sections=tuple(sections),
                  title="fedge profile report" if baseline is None else "fedge profile diff")


def build_report(
    job: Job, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False, top: int = 10,
    options: Mapping[str, Mapping[str, Any]] | None = None, registry: Registry[AnalysisPlugin] | None = None,
) -> dict[str, Any]:
    """Run all analyses and return the report object (JSON-ready).

    Keys: ``schema_version``, ``mode``, ``gpu_activity``, ``ranks`` (per rank ``rank``, ``device``, ``file``,
    ``span_us``, ``idle_us``, ``compute_us``, ``non_compute_us``, ``comm_us``, ``exposed_comm_us``,
    ``overlapped_comm_us``, ``overlap_pct``, ``memory_us``, ``*_pct``, ``host_wait_us``, ``num_kernels``),
    ``kernels``, ``collectives``, ``collective_wait``, ``stragglers``, ``recommendations``, ``analyses``
    (results that add no key of their own, third-party ones among them), ``errors`` (per-file problems),
    ``notes``.

    Example::

        report = build_report(load_job("traces/"), mode="hta")
        print(report["ranks"][0]["overlap_pct"])
    """
    return run_report(job, mode=mode, include_last_step=include_last_step, top=top, options=options,
                      registry=registry).data


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value / 1000:,.2f}" if unit == "ms" else f"{value:,.2f}"
    if isinstance(value, (list, tuple, dict)):
        return ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else ", ".join(map(str, value))
    return str(value)


def render_terminal(report: Report, console: Any = None) -> None:
    """Print the report as Rich tables, one per section."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    data = report.data
    console.print(f"[bold]{report.title}[/bold]  mode={data['mode']}  ranks={len(data['ranks'])}"
                  + ("" if data["gpu_activity"] else "  [yellow]no GPU activity[/yellow]"))
    for _, sections in report.sections:
        for s in sections:
            if s.columns and s.rows:
                table = Table(*(c.header for c in s.columns), title=s.title, title_justify="left")
                for row in s.rows:
                    table.add_row(*(escape(_fmt(row.get(c.key), c.unit)) for c in s.columns))
                console.print(table)
            elif s.lines:
                console.print(f"[bold]{escape(s.title)}[/bold]")
            for line in s.lines:
                console.print(f" - {escape(line)}")
    for note in data["notes"]:
        console.print(f"[dim]note: {escape(note)}[/dim]")


def _table(columns: tuple[Column, ...], rows: tuple[dict[str, Any], ...]) -> str:
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c.key), c.unit))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section_html(s: Section) -> str:
    parts = [f"<h2>{html.escape(s.title)}</h2>"]
    if s.figure:
        parts.append(f"<div>{s.figure}</div>")
    if s.columns:
        parts.append(_table(s.columns, s.rows) if s.rows else "<p>none</p>")
    if s.lines:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in s.lines) + "</ul>")
    return "\n".join(parts)


def render_html(report: Report) -> str:
    """A self-contained HTML page (inline SVG and CSS, no scripts, nothing fetched)."""
    data = report.data
    body = "\n".join(f'<section id="{html.escape(name)}">{_section_html(s)}</section>'
                     for name, sections in report.sections for s in sections)
    errors = "".join(f"<li>{html.escape(e['error'])}</li>" for e in data["errors"])
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data["notes"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}} th{{background:#f3f3f3}}
</style></head><body>
<h1>{html.escape(report.title)}</h1>
<p>mode: {html.escape(data["mode"])} &middot; ranks: {len(data["ranks"])}{"" if data["gpu_activity"] else " &middot; no GPU activity (CPU-side analysis)"}</p>
{body}
{f"<h2>Unreadable files</h2><ul>{errors}</ul>" if errors else ""}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
</body></html>
"""
