"""Communication/computation overlap per rank: how much communication runs hidden under computation and how
much is exposed (HTA's comm-comp overlap: |union(comm) ∩ union(comp)| / |union(comm)|)."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.profiler.analyses.base import AnalysisConfig, Result, as_job
from fedge.profiler.kinds import KernelKind, Mode
from fedge.profiler.timeline import cpu_intervals, intersection_us, kernels, union_us
from fedge.profiler.trace import Job, Trace
from fedge.registry import plugin

__all__ = ["CommCompOverlap", "Overlap", "RankOverlap", "comm_comp_overlap"]


@dataclass(frozen=True, slots=True)
class RankOverlap:
    """One rank (µs); ``overlap_pct`` is None when the rank has no communication."""

    rank: int
    device: str
    comm_us: float
    overlapped_comm_us: float
    exposed_comm_us: float
    overlap_pct: float | None


@dataclass(frozen=True, slots=True)
class CommCompOverlap(Result):
    """Per-rank comm/comp overlap."""

    mode: str
    rows: tuple[RankOverlap, ...]


def _rank_overlap(trace: Trace, mode: Mode, include_last_step: bool) -> RankOverlap:
    k = kernels(trace, mode, include_last_step=include_last_step)
    if len(k):
        comm, comp, device = k.of(KernelKind.COMMUNICATION), k.of(KernelKind.COMPUTATION), "gpu"
    else:
        iv = cpu_intervals(trace, include_last_step=include_last_step)
        comm, comp, device = iv["comm"], iv["compute"], "cpu"
    comm_us = union_us(*comm)
    hidden = intersection_us(comm, comp) if comm_us else 0.0
    pct = 100.0 * hidden / comm_us if comm_us else None
    return RankOverlap(trace.rank, device, comm_us, hidden, comm_us - hidden, pct)


def comm_comp_overlap(data: Job | Trace, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False) -> CommCompOverlap:
    """Share of communication time that overlaps computation, per rank.

    Example::

        ov = comm_comp_overlap(load_trace("rank0.json.gz"))
        print(ov.rows[0].overlap_pct, ov.rows[0].exposed_comm_us)
    """
    mode = Mode(mode)
    return CommCompOverlap(mode=mode.value, rows=tuple(_rank_overlap(t, mode, include_last_step) for t in as_job(data).traces))


@plugin("analysis", "overlap")
class Overlap:
    """Communication/computation overlap per rank: hidden vs exposed communication."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        pass

    @staticmethod
    def run(job: Job, config: Config) -> CommCompOverlap:
        return comm_comp_overlap(job, mode=config.mode, include_last_step=config.include_last_step)
