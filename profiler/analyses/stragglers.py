"""Stragglers: ranks that arrive late to collectives, ranked by how much they make the others wait.

Uses the cross-rank matching of :mod:`fedge.profiler.analyses.collectives`: for each collective, a rank's
delay is its (clock-aligned) start minus the earliest start; the last to arrive is the one the others
wait for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section, as_view
from fedge.profiler.analyses.collectives import collective_ops, match_collectives
from fedge.profiler.figures import stacked_bars_svg
from fedge.profiler.kinds import Mode
from fedge.profiler.trace import Job, Trace
from fedge.registry import plugin

__all__ = ["RankDelay", "StragglerReport", "Stragglers", "stragglers"]


@dataclass(frozen=True, slots=True)
class RankDelay:
    """One rank: over ``matched`` collectives, total and mean arrival delay (µs) and how often it came last.
    ``straggler`` is set when it came last in at least half of them and its mean delay is at least
    ``min_delay_us``."""

    rank: int
    matched: int
    total_delay_us: float
    mean_delay_us: float
    times_last: int
    straggler: bool


@dataclass(frozen=True, slots=True)
class StragglerReport(Result):
    """Ranks sorted by total arrival delay, worst first; empty for single-rank jobs."""

    mode: str
    rows: tuple[RankDelay, ...]

    @property
    def stragglers(self) -> list[int]:
        return [r.rank for r in self.rows if r.straggler]

    def report_fields(self) -> dict[str, object]:
        return {"stragglers": self.to_rows()}

    def sections(self) -> list[Section]:
        if not self.rows:
            return [Section("Arrival at collectives", lines=("single rank or no collectives matched across ranks",))]
        columns = (Column("rank", "rank"), Column("matched", "matched"), Column("mean_delay_us", "mean delay us"),
                   Column("times_last", "times last"), Column("straggler", "straggler"))
        bars = [(f"rank {r.rank}", 0.0, [("mean arrival delay", r.mean_delay_us)]) for r in self.rows]
        return [Section("Arrival at collectives", columns, tuple(self.to_rows()), figure=stacked_bars_svg(bars))]


def stragglers(
    data: Job | Trace | JobView, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False,
    min_delay_us: float = 50.0,
) -> StragglerReport:
    """Rank the ranks by how late they arrive to collectives.

    Example::

        report = stragglers(load_job("traces/"))
        print(report.stragglers, report.rows[0].mean_delay_us)
    """
    view = as_view(data, mode=mode, include_last_step=include_last_step)
    per_rank = {t.rank: collective_ops(view, t) for t in view.traces}
    totals: dict[int, list[float]] = {}
    for m in match_collectives(per_rank):
        delay = m.start - m.start.min(axis=0)
        last = np.argmax(m.start, axis=0)
        for j, r in enumerate(m.ranks):
            acc = totals.setdefault(r, [0, 0.0, 0])
            acc[0] += m.start.shape[1]
            acc[1] += float(delay[j].sum())
            acc[2] += int(np.sum(last == j))
    rows = []
    for r, (n, total, times_last) in totals.items():
        mean = total / n if n else 0.0
        rows.append(RankDelay(r, int(n), total, mean, int(times_last), bool(n and times_last * 2 >= n and mean >= min_delay_us)))
    rows.sort(key=lambda x: (-x.total_delay_us, x.rank))
    return StragglerReport(mode=view.mode.value, rows=tuple(rows))


@plugin("analysis", "stragglers")
class Stragglers:
    """Stragglers: ranks that arrive late to collectives, ranked, with by how much."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        min_delay_us: float = 50.0
        """Mean arrival delay (µs) below which a rank that often comes last is not called a straggler."""

    order = 60

    @staticmethod
    def run(view: JobView, config: Config) -> StragglerReport:
        return stragglers(view, mode=config.mode, include_last_step=config.include_last_step, min_delay_us=config.min_delay_us)
