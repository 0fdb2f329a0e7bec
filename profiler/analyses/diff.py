"""What changed between two runs (``fedge profile diff BASELINE CANDIDATE``): per rank and over all ranks,
the time per kind of work (computation, exposed and hidden communication, idle waiting on the host or on
something else), the kernel-type breakdown, every kernel and every collective, each compared by the time
it costs and ranked by how much that time grew or shrank. A kernel or collective only one side has is
marked ``new`` or ``gone``.

The two sides are two trace directories of the same job (ranks paired by number) or two single traces (for
instance two ranks of one job, paired whatever their numbers). An analysis of two traces: it reads
``view.baseline``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section
from fedge.profiler.analyses.collectives import collectives
from fedge.profiler.analyses.idle import idle_time
from fedge.profiler.analyses.kernel_breakdown import kernel_breakdown, short_name
from fedge.profiler.analyses.overlap import comm_comp_overlap
from fedge.profiler.analyses.temporal import temporal_breakdown
from fedge.profiler.kinds import KernelKind
from fedge.profiler.trace import Trace
from fedge.registry import plugin

__all__ = ["Change", "TraceDiff", "TraceDiffAnalysis", "diff_traces", "pair_ranks"]

# (category, name) -> (time µs, count or None, detail such as bytes and bus bandwidth)
_Measures = dict[tuple[str, str], tuple[float, int | None, str]]


@dataclass(frozen=True, slots=True)
class Change:
    """One measure that differs. ``scope`` is ``rank B->C`` (baseline rank, candidate rank) or ``all ranks``;
    ``status`` is ``new``, ``gone``, ``grew`` or ``shrank``; ``delta_pct`` is None for ``new``."""

    scope: str
    category: str
    name: str
    baseline_us: float
    candidate_us: float
    delta_us: float
    delta_pct: float | None
    baseline_count: int | None
    candidate_count: int | None
    status: str
    detail: str


@dataclass(frozen=True, slots=True)
class TraceDiff(Result):
    """What changed, baseline -> candidate, biggest change in time first."""

    mode: str
    pairs: tuple[tuple[int, int], ...]
    unpaired: tuple[str, ...]
    rows: tuple[Change, ...]
    show: int = 40

    def report_fields(self) -> dict[str, object]:
        return {"pairs": [list(p) for p in self.pairs], "unpaired": list(self.unpaired), "changes": self.to_rows()}

    def sections(self) -> list[Section]:
        columns = (Column("scope", "scope"), Column("category", "what"), Column("name", "name"),
                   Column("baseline_us", "baseline ms", "ms"), Column("candidate_us", "candidate ms", "ms"),
                   Column("delta_us", "change ms", "ms"), Column("delta_pct", "change %"), Column("counts", "count"),
                   Column("status", "status"), Column("detail", "detail"))
        rows = tuple(
            {**r, "name": short_name(r["name"]), "counts": _counts(r["baseline_count"], r["candidate_count"])}
            for r in self.to_rows()[: self.show]
        )
        if not rows:
            return [Section("What changed", lines=("nothing: the two sides spend their time the same way",))]
        more = len(self.rows) - len(rows)
        lines = (f"{more} smaller changes in --json",) if more > 0 else ()
        return [Section("What changed (baseline -> candidate, biggest first)", columns, rows, lines=lines)]

    def notes(self) -> list[str]:
        return [f"not compared: {u}" for u in self.unpaired]


def _counts(b: int | None, c: int | None) -> str:
    if b is None and c is None:
        return ""
    return f"{b if b is not None else '-'} -> {c if c is not None else '-'}"


def pair_ranks(baseline: JobView, candidate: JobView) -> tuple[list[tuple[Trace, Trace]], list[str]]:
    """Rank pairs to compare, and what could not be paired: by rank number, or the two traces when each side
    has exactly one."""
    if len(baseline.traces) == 1 and len(candidate.traces) == 1:
        return [(baseline.traces[0], candidate.traces[0])], []
    b = {t.rank: t for t in baseline.traces}
    c = {t.rank: t for t in candidate.traces}
    pairs = [(b[r], c[r]) for r in sorted(set(b) & set(c))]
    unpaired = [f"baseline rank {r} (no such rank in the candidate)" for r in sorted(set(b) - set(c))]
    unpaired += [f"candidate rank {r} (no such rank in the baseline)" for r in sorted(set(c) - set(b))]
    return pairs, unpaired


def _kernel_totals(view: JobView, trace: Trace) -> _Measures:
    k = view.kernels(trace)
    out: _Measures = {}
    if not len(k):
        return out
    key = k.name.astype(np.int64) * 4 + k.kind
    uniq, inverse = np.unique(key, return_inverse=True)
    total = np.bincount(inverse, weights=k.end - k.ts)
    count = np.bincount(inverse)
    for u, t, n in zip(uniq.tolist(), total.tolist(), count.tolist()):
        kind = KernelKind(u % 4).name.lower()
        out[(f"{kind} kernel", trace.names[u // 4])] = (t, n, "")
    return out


def _measures(view: JobView) -> dict[int, _Measures]:
    """Per rank of ``view``: every measure the diff compares."""
    out: dict[int, _Measures] = defaultdict(dict)
    for t, o, i in zip(temporal_breakdown(view, mode=view.mode, include_last_step=view.include_last_step).rows,
                       comm_comp_overlap(view, mode=view.mode, include_last_step=view.include_last_step).rows,
                       idle_time(view, mode=view.mode, include_last_step=view.include_last_step).rows):
        m = out[t.rank]
        m[("time", "span")] = (t.span_us, None, "")
        m[("time", "computation")] = (t.compute_us, None, "")
        m[("time", "exposed communication")] = (o.exposed_comm_us, None, "")
        m[("time", "hidden communication")] = (o.overlapped_comm_us, None, "")
        m[("time", "idle: waiting on the host")] = (i.host_wait_us, None, "")
        m[("time", "idle: other")] = (i.other_us, None, "")
    for r in kernel_breakdown(view, mode=view.mode, include_last_step=view.include_last_step, top=0).ranks:
        for label, us in r.exclusive_us.items():
            out[r.rank][("kernel type", label)] = (us, None, "")
    for c in collectives(view, mode=view.mode, include_last_step=view.include_last_step).rows:
        size = f"{c.total_bytes / 1e6:,.1f} MB" if c.total_bytes is not None else "size unknown"
        bw = f", busbw {c.busbw_gbps:.2f} GB/s" if c.busbw_gbps is not None else ""
        out[c.rank][("collective", f"{c.collective} [{c.group}]")] = (c.total_us, c.count, size + bw)
    for trace in view.traces:
        out[trace.rank].update(_kernel_totals(view, trace))
    return out


def _change(scope: str, key: tuple[str, str], b: tuple[float, int | None, str] | None,
            c: tuple[float, int | None, str] | None) -> Change | None:
    b_us, b_n, b_detail = b if b is not None else (0.0, None, "")
    c_us, c_n, c_detail = c if c is not None else (0.0, None, "")
    delta = c_us - b_us
    if abs(delta) < 1e-9 and b_n == c_n:
        return None
    status = "new" if b is None else "gone" if c is None else "grew" if delta >= 0 else "shrank"
    detail = b_detail if b_detail == c_detail else f"{b_detail or '-'} -> {c_detail or '-'}"
    pct = 100.0 * delta / b_us if b is not None and b_us else None
    return Change(scope, key[0], key[1], b_us, c_us, delta, pct, b_n, c_n, status, detail)


def diff_traces(baseline: JobView, candidate: JobView, *, min_delta_us: float = 0.0, show: int = 40) -> TraceDiff:
    """Compare two views read under the same definitions (``candidate.mode`` is used for both).

    Example::

        d = diff_traces(JobView(load_job("runs/old/traces")), JobView(load_job("runs/new/traces")))
        print(d.rows[0].scope, d.rows[0].name, d.rows[0].delta_us)
    """
    if baseline.mode is not candidate.mode or baseline.include_last_step != candidate.include_last_step:
        baseline = JobView(baseline.job, mode=candidate.mode, include_last_step=candidate.include_last_step)
    pairs, unpaired = pair_ranks(baseline, candidate)
    b_all, c_all = _measures(baseline), _measures(candidate)
    rows: list[Change] = []
    total_b: _Measures = {}
    total_c: _Measures = {}
    for bt, ct in pairs:
        b, c = b_all[bt.rank], c_all[ct.rank]
        scope = f"rank {bt.rank}" if bt.rank == ct.rank else f"rank {bt.rank}->{ct.rank}"
        for key in sorted(set(b) | set(c)):
            change = _change(scope, key, b.get(key), c.get(key))
            if change is not None:
                rows.append(change)
        for side, totals in ((b, total_b), (c, total_c)):
            for key, (us, n, _) in side.items():
                old_us, old_n, _ = totals.get(key, (0.0, None, ""))
                totals[key] = (old_us + us, (old_n or 0) + n if n is not None else old_n, "")
    if len(pairs) > 1:
        for key in sorted(set(total_b) | set(total_c)):
            change = _change("all ranks", key, total_b.get(key), total_c.get(key))
            if change is not None:
                rows.append(change)
    rows = [r for r in rows if abs(r.delta_us) >= min_delta_us or r.status in ("new", "gone")]
    rows.sort(key=lambda r: (-abs(r.delta_us), r.scope, r.category, r.name))
    return TraceDiff(mode=candidate.mode.value, pairs=tuple((b.rank, c.rank) for b, c in pairs),
                     unpaired=tuple(unpaired), rows=tuple(rows), show=show)


@plugin("analysis", "diff")
class TraceDiffAnalysis:
    """What changed between two runs: time per kind of work, kernel types, kernels and collectives, per rank."""

    inputs = 2  # an analysis of a baseline and a candidate (fedge profile diff)

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        min_delta_us: float = 0.0
        """Changes smaller than this (µs) are left out; new and gone kernels are always listed."""

        show: int = 40
        """Changes shown in the terminal and HTML, biggest first (--json has them all)."""

        def __post_init__(self) -> None:
            AnalysisConfig.__post_init__(self)
            if self.min_delta_us < 0 or self.show < 0:
                raise ValueError(f"min_delta_us and show must be >= 0, got {self.min_delta_us} and {self.show}")

    @staticmethod
    def run(view: JobView, config: Config) -> TraceDiff:
        if view.baseline is None:
            raise ValueError("diff compares two runs: use fedge profile diff BASELINE CANDIDATE")
        return diff_traces(view.baseline, view, min_delta_us=config.min_delta_us, show=config.show)
