"""Temporal breakdown per rank: of the span from the first kernel start to the last kernel end, how much
the GPU is idle, computing, or doing only non-compute work (communication, memory)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section, as_view, jsonable
from fedge.profiler.figures import stacked_bars_svg
from fedge.profiler.kinds import KernelKind, Mode
from fedge.profiler.timeline import union_us
from fedge.profiler.trace import Job, Trace
from fedge.registry import plugin

__all__ = ["RankTime", "Temporal", "TemporalBreakdown", "temporal_breakdown"]


@dataclass(frozen=True, slots=True)
class RankTime:
    """One rank's breakdown (µs). ``device`` is ``gpu``, or ``cpu`` for a trace with no GPU activity, where
    the same quantities are measured on CPU ops (collectives vs the rest)."""

    rank: int
    device: str
    span_us: float
    idle_us: float
    compute_us: float
    non_compute_us: float
    memory_us: float
    num_kernels: int

    @property
    def idle_pct(self) -> float:
        return 100.0 * self.idle_us / self.span_us if self.span_us else 0.0

    @property
    def compute_pct(self) -> float:
        return 100.0 * self.compute_us / self.span_us if self.span_us else 0.0

    @property
    def non_compute_pct(self) -> float:
        return 100.0 * self.non_compute_us / self.span_us if self.span_us else 0.0


@dataclass(frozen=True, slots=True)
class TemporalBreakdown(Result):
    """Per-rank temporal breakdown."""

    mode: str
    rows: tuple[RankTime, ...]

    def to_rows(self) -> list[dict[str, object]]:
        return [
            {**jsonable(r), "idle_pct": round(r.idle_pct, 2), "compute_pct": round(r.compute_pct, 2),
             "non_compute_pct": round(r.non_compute_pct, 2)}
            for r in self.rows
        ]

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode, "rows": self.to_rows()}

    def rank_fields(self) -> dict[int, dict[str, object]]:
        return {r["rank"]: {k: v for k, v in r.items() if k != "rank"} for r in self.to_rows()}  # type: ignore[misc]

    def sections(self) -> list[Section]:
        bars = [(f"rank {r.rank}", r.span_us, [("compute", r.compute_us), ("non-compute", r.non_compute_us),
                                                ("idle", r.idle_us)]) for r in self.rows]
        columns = (Column("rank", "rank"), Column("device", "device"), Column("span_us", "span ms", "ms"),
                   Column("idle_pct", "idle %"), Column("compute_pct", "compute %"),
                   Column("non_compute_pct", "non-compute %"), Column("memory_us", "memory ms", "ms"))
        return [Section("Time per rank", columns, tuple(self.to_rows()), figure=stacked_bars_svg(bars))]

    def notes(self) -> list[str]:
        cpu_only = [r.rank for r in self.rows if r.device == "cpu"]
        if not cpu_only:
            return []
        return [f"no GPU activity on rank(s) {', '.join(map(str, cpu_only))}: CPU-side collectives analysed instead"]


def _rank_time(view: JobView, trace: Trace) -> RankTime:
    k = view.kernels(trace)
    if len(k):
        span = float(k.end.max() - k.ts.min())
        idle = span - k.union_us()
        compute = k.union_us(KernelKind.COMPUTATION)
        memory = k.union_us(KernelKind.MEMORY)
        return RankTime(trace.rank, "gpu", span, idle, compute, span - compute - idle, memory, len(k))
    iv = view.cpu_intervals(trace)
    comp, comm = iv["compute"], iv["comm"]
    starts = [a.min() for a in (comp[0], comm[0]) if len(a)]
    ends = [a.max() for a in (comp[1], comm[1]) if len(a)]
    if not starts:
        return RankTime(trace.rank, "cpu", 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    span = float(max(ends) - min(starts))
    busy = union_us(np.concatenate([comp[0], comm[0]]), np.concatenate([comp[1], comm[1]]))
    compute = union_us(*comp)
    return RankTime(trace.rank, "cpu", span, span - busy, compute, busy - compute, 0.0, 0)


def temporal_breakdown(
    data: Job | Trace | JobView, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False
) -> TemporalBreakdown:
    """Idle / compute / non-compute time per rank.

    span = last kernel end - first kernel start (all streams); idle = span - |union of all GPU events|;
    compute = |union of computation kernels|; non-compute = span - compute - idle.

    Example::

        tb = temporal_breakdown(load_job("traces/"), mode="hta")
        print(tb.to_rows()[0]["compute_pct"])
    """
    view = as_view(data, mode=mode, include_last_step=include_last_step)
    return view.once("temporal", lambda: TemporalBreakdown(mode=view.mode.value, rows=tuple(_rank_time(view, t) for t in view.traces)))


@plugin("analysis", "temporal")
class Temporal:
    """Temporal breakdown per rank: idle, compute and non-compute share of the GPU span."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        pass

    order = 10

    @staticmethod
    def run(view: JobView, config: Config) -> TemporalBreakdown:
        return temporal_breakdown(view, mode=config.mode, include_last_step=config.include_last_step)
