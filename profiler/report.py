"""The report: runs every analysis over a job and assembles the JSON object documented in
docs/profiler.md (the DESIGN.md contract), then renders it for the terminal or as a standalone HTML page."""

from __future__ import annotations

import html
import logging
from typing import Any

from fedge.profiler.analyses.base import jsonable
from fedge.profiler.analyses.collectives import collectives
from fedge.profiler.analyses.idle import idle_time
from fedge.profiler.analyses.kernel_breakdown import kernel_breakdown
from fedge.profiler.analyses.overlap import comm_comp_overlap
from fedge.profiler.analyses.recommendations import recommend
from fedge.profiler.analyses.stragglers import stragglers
from fedge.profiler.analyses.temporal import temporal_breakdown
from fedge.profiler.kinds import Mode
from fedge.profiler.trace import Job
from fedge.registry import Kind, Registry

__all__ = ["BUILTIN_ANALYSES", "build_report", "render_html", "render_terminal"]

logger = logging.getLogger(__name__)

#: Analyses whose results make up the fixed part of the report; other installed analyses go under "analyses".
BUILTIN_ANALYSES = ("temporal", "overlap", "kernels", "collectives", "stragglers", "idle", "recommendations")
SCHEMA_VERSION = 1


def _extra_analyses(job: Job, mode: Mode, include_last_step: bool, registry: Registry[Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Run the installed third-party analyses; a failing one becomes a note, not a crash."""
    registry = registry if registry is not None else Registry(Kind.ANALYSIS)
    results: dict[str, Any] = {}
    notes: list[str] = []
    for name in registry.names():
        if name in BUILTIN_ANALYSES:
            continue
        try:
            plugin = registry.get(name)
            try:
                config = plugin.Config(mode=mode.value, include_last_step=include_last_step)
            except TypeError:
                config = plugin.Config()
            results[name] = jsonable(plugin.run(job, config).to_json())
        except Exception as err:  # a third-party analysis must not take the report down
            notes.append(f"analysis {name!r} failed: {type(err).__name__}: {err}")
            logger.debug("analysis %s failed", name, exc_info=True)
    return results, notes


def build_report(
    job: Job, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False, top: int = 10,
    registry: Registry[Any] | None = None,
) -> dict[str, Any]:
    """Run all analyses and return the report object (JSON-ready).

    Keys: ``schema_version``, ``mode``, ``gpu_activity``, ``ranks`` (per rank ``rank``, ``device``, ``file``,
    ``span_us``, ``idle_us``, ``compute_us``, ``non_compute_us``, ``comm_us``, ``exposed_comm_us``,
    ``overlapped_comm_us``, ``overlap_pct``, ``memory_us``, ``*_pct``, ``host_wait_us``, ``num_kernels``),
    ``kernels``, ``collectives``, ``collective_wait``, ``stragglers``, ``recommendations``, ``analyses``
    (third-party), ``errors`` (per-file problems), ``notes``.

    Example::

        report = build_report(load_job("traces/"), mode="hta")
        print(report["ranks"][0]["overlap_pct"])
    """
    mode = Mode(mode)
    kw: dict[str, Any] = {"mode": mode, "include_last_step": include_last_step}
    temporal = temporal_breakdown(job, **kw)
    overlap = comm_comp_overlap(job, **kw)
    idle = idle_time(job, **kw)
    kerns = kernel_breakdown(job, top=top, **kw)
    colls = collectives(job, **kw)
    late = stragglers(job, **kw)
    recs = recommend(temporal, overlap, idle, colls, late)
    files = {t.rank: t.path for t in job.traces}
    ranks = []
    for t, o, i in zip(temporal.to_rows(), overlap.to_rows(), idle.to_rows()):
        ranks.append({
            "rank": t["rank"], "device": t["device"], "file": files.get(t["rank"]),
            "span_us": t["span_us"], "idle_us": t["idle_us"], "compute_us": t["compute_us"],
            "non_compute_us": t["non_compute_us"], "comm_us": o["comm_us"], "exposed_comm_us": o["exposed_comm_us"],
            "overlapped_comm_us": o["overlapped_comm_us"], "overlap_pct": o["overlap_pct"], "memory_us": t["memory_us"],
            "idle_pct": t["idle_pct"], "compute_pct": t["compute_pct"], "non_compute_pct": t["non_compute_pct"],
            "host_wait_us": i["host_wait_us"], "num_kernels": t["num_kernels"],
        })
    notes = [n for t in job.traces for n in t.notes]
    cpu_only = [r["rank"] for r in ranks if r["device"] == "cpu"]
    if cpu_only:
        notes.append(f"no GPU activity on rank(s) {', '.join(map(str, cpu_only))}: CPU-side collectives analysed instead")
    extra, extra_notes = _extra_analyses(job, mode, include_last_step, registry)
    return {
        "schema_version": SCHEMA_VERSION,
        "mode": mode.value,
        "gpu_activity": any(t.has_gpu for t in job.traces),
        "ranks": ranks,
        "kernels": [
            {"rank": r.rank, "exclusive_us": jsonable(r.exclusive_us), "sum_us": jsonable(r.sum_us), "top": jsonable(r.top)}
            for r in kerns.ranks
        ],
        "collectives": colls.to_rows(),
        "collective_wait": jsonable(colls.wait),
        "stragglers": late.to_rows(),
        "recommendations": recs.to_rows(),
        "analyses": extra,
        "errors": [e.to_json() for e in job.errors],
        "notes": notes + extra_notes,
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if unit == "ms":
            return f"{value / 1000:,.2f}"
        return f"{value:,.2f}"
    return str(value)


def _short(name: str, width: int = 60) -> str:
    """A kernel name without return type and argument list, cut to ``width``."""
    base = name.split("(", 1)[0] if not name.startswith("(") else name
    base = base.removeprefix("void ")
    return base if len(base) <= width else base[: width - 1] + "…"


def render_terminal(report: dict[str, Any], console: Any = None) -> None:
    """Print the report as Rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]fedge profile report[/bold]  mode={report['mode']}  ranks={len(report['ranks'])}"
                  + ("" if report["gpu_activity"] else "  [yellow]no GPU activity[/yellow]"))
    table = Table("rank", "device", "span ms", "idle %", "compute %", "non-compute %", "comm ms", "exposed comm ms",
                  "overlap %", "host wait ms", title="Time per rank", title_justify="left")
    for r in report["ranks"]:
        table.add_row(str(r["rank"]), r["device"], _fmt(r["span_us"], "ms"), _fmt(r["idle_pct"]), _fmt(r["compute_pct"]),
                      _fmt(r["non_compute_pct"]), _fmt(r["comm_us"], "ms"), _fmt(r["exposed_comm_us"], "ms"),
                      _fmt(r["overlap_pct"]), _fmt(r["host_wait_us"], "ms"))
    console.print(table)
    if report["collectives"]:
        table = Table("rank", "collective", "group", "count", "total ms", "mean us", "mean bytes", "algbw GB/s",
                      "busbw GB/s", title="Collectives", title_justify="left")
        for c in report["collectives"]:
            table.add_row(str(c["rank"]), c["collective"], c["group"], str(c["count"]), _fmt(c["total_us"], "ms"),
                          _fmt(c["mean_us"]), _fmt(c["mean_bytes"]), _fmt(c["algbw_gbps"]), _fmt(c["busbw_gbps"]))
        console.print(table)
    if report["collective_wait"]:
        table = Table("rank", "matched", "wait ms", "transfer ms", title="Collective wait vs transfer", title_justify="left")
        for w in report["collective_wait"]:
            table.add_row(str(w["rank"]), str(w["matched"]), _fmt(w["wait_us"], "ms"), _fmt(w["transfer_us"], "ms"))
        console.print(table)
    if report["stragglers"]:
        table = Table("rank", "matched", "mean delay us", "times last", "straggler", title="Arrival at collectives",
                      title_justify="left")
        for s in report["stragglers"]:
            table.add_row(str(s["rank"]), str(s["matched"]), _fmt(s["mean_delay_us"]), str(s["times_last"]),
                          "yes" if s["straggler"] else "")
        console.print(table)
    table = Table("rank", "kind", "kernel", "count", "total ms", "mean us", title="Top kernels", title_justify="left")
    for k in report["kernels"]:
        for s in k["top"][:5]:
            table.add_row(str(k["rank"]), s["kind"], _short(s["name"]), str(s["count"]), _fmt(s["sum_us"], "ms"), _fmt(s["mean_us"]))
    if table.row_count:
        console.print(table)
    for name, result in report["analyses"].items():
        console.print(f"[bold]{name}[/bold]: {result}")
    console.print("[bold]Recommendations[/bold]")
    for r in report["recommendations"]:
        console.print(f" - {r['message']}")
    for note in report["notes"]:
        console.print(f"[dim]note: {note}[/dim]")


_COLOURS = {"compute": "#4c78a8", "overlapped comm": "#72b7b2", "exposed comm": "#e45756", "memory/other": "#f58518",
            "idle": "#bab0ac"}


def _bars_svg(ranks: list[dict[str, Any]]) -> str:
    width, bar_h, left = 720, 22, 70
    height = 30 + len(ranks) * (bar_h + 8)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + left + 10}" height="{height}" role="img">']
    for i, r in enumerate(ranks):
        span = r["span_us"] or 0.0
        segments = {
            "compute": r["compute_us"] - (r["overlapped_comm_us"] if r["device"] == "gpu" else 0.0),
            "overlapped comm": r["overlapped_comm_us"] if r["device"] == "gpu" else 0.0,
            "exposed comm": r["exposed_comm_us"],
            "memory/other": r["non_compute_us"] - r["exposed_comm_us"],
            "idle": r["idle_us"],
        }
        y = 20 + i * (bar_h + 8)
        parts.append(f'<text x="0" y="{y + 15}" font-size="12">rank {r["rank"]}</text>')
        x = float(left)
        for label, value in segments.items():
            w = max(value, 0.0) / span * width if span else 0.0
            if w <= 0:
                continue
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{_COLOURS[label]}">'
                         f"<title>rank {r['rank']}: {label} {value / 1000:.2f} ms ({100 * value / span:.1f}%)</title></rect>")
            x += w
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page (inline SVG and CSS, no scripts, nothing fetched)."""
    legend = "".join(f'<span class="key"><i style="background:{c}"></i>{html.escape(k)}</span>' for k, c in _COLOURS.items())
    late = report["stragglers"]
    max_delay = max((s["mean_delay_us"] or 0.0 for s in late), default=0.0) or 1.0
    straggler_rows = "".join(
        f'<div class="row"><span>rank {s["rank"]}</span><b style="width:{300 * (s["mean_delay_us"] or 0) / max_delay:.0f}px">'
        f'</b>{_fmt(s["mean_delay_us"])} us mean delay, last {s["times_last"]}/{s["matched"]}</div>'
        for s in late
    ) or "<p>single rank or no collectives matched across ranks</p>"
    recs = "".join(f"<li>{html.escape(r['message'])}</li>" for r in report["recommendations"])
    errors = "".join(f"<li>{html.escape(e['error'])}</li>" for e in report["errors"])
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedge profile report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}} th{{background:#f3f3f3}}
.key{{margin-right:1em;font-size:13px}} .key i{{display:inline-block;width:12px;height:12px;margin-right:4px}}
.row{{font-size:13px;margin:4px 0}} .row span{{display:inline-block;width:70px}}
.row b{{display:inline-block;height:12px;background:#e45756;margin-right:8px;vertical-align:middle}}
</style></head><body>
<h1>fedge profile report</h1>
<p>mode: {html.escape(report["mode"])} &middot; ranks: {len(report["ranks"])}{"" if report["gpu_activity"] else " &middot; no GPU activity (CPU-side analysis)"}</p>
<h2>Time per rank</h2><div>{legend}</div>{_bars_svg(report["ranks"])}
{_table(report["ranks"], ["rank", "device", "span_us", "idle_pct", "compute_pct", "non_compute_pct", "comm_us", "exposed_comm_us", "overlap_pct", "host_wait_us"])}
<h2>Collectives</h2>
{_table(report["collectives"], ["rank", "collective", "group", "count", "total_us", "mean_us", "mean_bytes", "algbw_gbps", "busbw_gbps"])}
{_table(report["collective_wait"], ["rank", "matched", "wait_us", "transfer_us"])}
<h2>Stragglers</h2>{straggler_rows}
<h2>Recommendations</h2><ul>{recs}</ul>
{f"<h2>Unreadable files</h2><ul>{errors}</ul>" if errors else ""}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
</body></html>
"""
