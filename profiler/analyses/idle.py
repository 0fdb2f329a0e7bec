"""Idle time per rank: gaps in the GPU timeline, split into waiting on the host (the next kernel had not
been launched yet when the GPU went idle) and other (dependencies, synchronisation, the profiler)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section, as_view, jsonable
from fedge.profiler.kinds import Mode
from fedge.profiler.timeline import Kernels, launch_rows
from fedge.profiler.trace import Job, Trace
from fedge.registry import plugin

__all__ = ["IdleBreakdown", "IdleTime", "RankIdle", "idle_time"]


@dataclass(frozen=True, slots=True)
class RankIdle:
    """One rank (µs); ``num_gaps`` counts the idle intervals of the merged GPU timeline."""

    rank: int
    idle_us: float
    host_wait_us: float
    other_us: float
    num_gaps: int


@dataclass(frozen=True, slots=True)
class IdleBreakdown(Result):
    """Idle time per rank, host wait vs other."""

    mode: str
    rows: tuple[RankIdle, ...]

    def rank_fields(self) -> dict[int, dict[str, object]]:
        return {r.rank: {"host_wait_us": jsonable(r.host_wait_us)} for r in self.rows}

    def sections(self) -> list[Section]:
        columns = (Column("rank", "rank"), Column("idle_us", "idle ms", "ms"), Column("host_wait_us", "host wait ms", "ms"),
                   Column("other_us", "other ms", "ms"), Column("num_gaps", "gaps"))
        return [Section("GPU idle time: waiting on the host vs other", columns, tuple(self.to_rows()))]


def _rank_idle(trace: Trace, k: Kernels, mode: Mode) -> RankIdle:
    if len(k) < 2:
        return RankIdle(trace.rank, 0.0, 0.0, 0.0, 0)
    idle = host_wait = 0.0
    num_gaps = 0
    last_end: float | None = None
    for s, e, pos in k.merged_blocks():  # gaps between merged intervals, a block at a time
        if not len(s):
            continue
        if last_end is None:
            gap_start, gap_end, after = e[:-1], s[1:], pos[1:]
        else:
            gap_start, gap_end, after = np.r_[last_end, e[:-1]], s, pos
        last_end = float(e[-1])
        host = _host_wait(trace, k, mode, gap_start, gap_end, after)
        idle += float(np.sum(gap_end - gap_start))
        host_wait += float(host.sum())
        num_gaps += len(gap_start)
    return RankIdle(trace.rank, idle, host_wait, idle - host_wait, num_gaps)


def _host_wait(trace: Trace, k: Kernels, mode: Mode, gap_start: np.ndarray, gap_end: np.ndarray,
               after: np.ndarray) -> np.ndarray:
    """Per gap, the part before the launch of the event that ends it returned. That event is the first in
    (start, row) order that starts at the gap's end: the merged interval's first, or one just before it that
    starts at the same time (an interval ending before it starts, as HTA's rounding makes, stands alone)."""
    at = after.copy()
    while True:
        back = np.flatnonzero(at > 0)
        back = back[k.ts_at(k.by_ts[at[back] - 1]) >= gap_end[back]]
        if not len(back):
            break
        at[back] -= 1
    rows = launch_rows(trace, trace.gpu.corr[k.row[k.by_ts[at]]])
    launch_end = np.full(len(rows), -np.inf)
    launch_end[rows >= 0] = trace.cpu.end_at(rows[rows >= 0])
    if mode is Mode.HTA:
        launch_end = np.floor(launch_end)
    return np.clip(np.minimum(launch_end, gap_end) - gap_start, 0.0, None)


def idle_time(data: Job | Trace | JobView, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False) -> IdleBreakdown:
    """GPU idle time per rank, split into host wait and other.

    A gap counts as host wait up to the moment the runtime call that launched the kernel after the gap
    returned: until then the GPU had nothing queued.

    Example::

        idle = idle_time(load_trace("rank0.json.gz"))
        print(idle.rows[0].host_wait_us)
    """
    view = as_view(data, mode=mode, include_last_step=include_last_step)
    return view.once("idle", lambda: IdleBreakdown(mode=view.mode.value,
                                                   rows=tuple(_rank_idle(t, view.kernels(t), view.mode) for t in view.traces)))


@plugin("analysis", "idle")
class IdleTime:
    """Idle time per rank: GPU waiting on the host vs other."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        pass

    order = 30

    @staticmethod
    def run(view: JobView, config: Config) -> IdleBreakdown:
        return idle_time(view, mode=config.mode, include_last_step=config.include_last_step)
