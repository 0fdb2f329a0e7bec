"""Communication/computation overlap per rank: how much communication runs hidden under computation and how
much is exposed (HTA's comm-comp overlap: |union(comm) ∩ union(comp)| / |union(comm)|)."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section, as_view
from fedge.profiler.kinds import KernelKind, Mode
from fedge.profiler.timeline import intersection_us, union_us
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

    def rank_fields(self) -> dict[int, dict[str, object]]:
        keep = ("comm_us", "exposed_comm_us", "overlapped_comm_us", "overlap_pct")
        return {r["rank"]: {k: r[k] for k in keep} for r in self.to_rows()}

    def sections(self) -> list[Section]:
        columns = (Column("rank", "rank"), Column("device", "device"), Column("comm_us", "comm ms", "ms"),
                   Column("overlapped_comm_us", "hidden comm ms", "ms"), Column("exposed_comm_us", "exposed comm ms", "ms"),
                   Column("overlap_pct", "overlap %"))
        return [Section("Communication hidden under computation", columns, tuple(self.to_rows()))]


def _rank_overlap(view: JobView, trace: Trace) -> RankOverlap:
    k = view.kernels(trace)
    if len(k):
        comm, comp, device = KernelKind.COMMUNICATION, KernelKind.COMPUTATION, "gpu"
        comm_us = k.union_us(comm)
        hidden = comm_us + k.union_us(comp) - k.union_us(comm, comp) if comm_us else 0.0  # |A|+|B|-|A∪B|
    else:
        iv = view.cpu_intervals(trace)
        comm_us = union_us(*iv["comm"])
        hidden = intersection_us(iv["comm"], iv["compute"]) if comm_us else 0.0
        device = "cpu"
    pct = 100.0 * hidden / comm_us if comm_us else None
    return RankOverlap(trace.rank, device, comm_us, hidden, comm_us - hidden, pct)


def comm_comp_overlap(
    data: Job | Trace | JobView, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False
) -> CommCompOverlap:
    """Share of communication time that overlaps computation, per rank.

    Example::

        ov = comm_comp_overlap(load_trace("rank0.json.gz"))
        print(ov.rows[0].overlap_pct, ov.rows[0].exposed_comm_us)
    """
    view = as_view(data, mode=mode, include_last_step=include_last_step)
    return view.once("overlap", lambda: CommCompOverlap(mode=view.mode.value, rows=tuple(_rank_overlap(view, t) for t in view.traces)))


@plugin("analysis", "overlap")
class Overlap:
    """Communication/computation overlap per rank: hidden vs exposed communication."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        pass

    order = 20

    @staticmethod
    def run(view: JobView, config: Config) -> CommCompOverlap:
        return comm_comp_overlap(view, mode=config.mode, include_last_step=config.include_last_step)
