"""Kernel-type breakdown per rank: time in computation, communication and memory kernels (exclusive
combinations, as HTA's pie, and plain sums), plus the kernels that take the most time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.profiler import timeline
from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section, as_view, jsonable
from fedge.profiler.kinds import KernelKind, Mode
from fedge.profiler.timeline import Kernels, exclusive_kinds
from fedge.profiler.trace import Job, Trace
from fedge.registry import plugin

__all__ = ["KernelBreakdown", "KernelStat", "KernelTypes", "RankKernels", "kernel_breakdown"]


@dataclass(frozen=True, slots=True)
class KernelStat:
    """One kernel name on one rank (µs)."""

    rank: int
    kind: str
    name: str
    count: int
    sum_us: float
    mean_us: float
    min_us: float
    max_us: float


@dataclass(frozen=True, slots=True)
class RankKernels:
    """One rank: ``exclusive_us`` maps ``"COMPUTATION"``, ``"COMPUTATION overlapping COMMUNICATION"``... to
    the time exactly that combination runs; ``sum_us`` is the plain sum of durations per kind."""

    rank: int
    exclusive_us: dict[str, float]
    sum_us: dict[str, float]
    top: tuple[KernelStat, ...]


@dataclass(frozen=True, slots=True)
class KernelBreakdown(Result):
    """Kernel-type breakdown and top kernels per rank."""

    mode: str
    ranks: tuple[RankKernels, ...]

    def all_ranks_exclusive_us(self) -> dict[str, float]:
        """``exclusive_us`` summed over ranks (HTA's all-ranks pie)."""
        total: dict[str, float] = {}
        for r in self.ranks:
            for key, value in r.exclusive_us.items():
                total[key] = total.get(key, 0.0) + value
        return total

    def to_rows(self) -> list[dict[str, object]]:
        return [
            {"rank": r.rank, "kernel_type": key, "exclusive_us": round(value, 3)}
            for r in self.ranks
            for key, value in sorted(r.exclusive_us.items(), key=lambda kv: -kv[1])
        ]

    def report_fields(self) -> dict[str, object]:
        return {"kernels": [
            {"rank": r.rank, "exclusive_us": jsonable(r.exclusive_us), "sum_us": jsonable(r.sum_us), "top": jsonable(r.top)}
            for r in self.ranks
        ]}

    def sections(self) -> list[Section]:
        types = (Column("rank", "rank"), Column("kernel_type", "kernel type"), Column("exclusive_us", "time ms", "ms"))
        top = tuple({"rank": s.rank, "kind": s.kind, "name": short_name(s.name), "count": s.count, "sum_us": s.sum_us,
                     "mean_us": s.mean_us} for r in self.ranks for s in r.top)
        columns = (Column("rank", "rank"), Column("kind", "kind"), Column("name", "kernel"), Column("count", "count"),
                   Column("sum_us", "total ms", "ms"), Column("mean_us", "mean us"))
        return [Section("Kernel types (time exactly each combination runs)", types, tuple(self.to_rows())),
                Section("Top kernels", columns, top)]


def short_name(name: str, width: int = 60) -> str:
    """A kernel name without return type and argument list, cut to ``width``."""
    base = name.split("(", 1)[0] if not name.startswith("(") else name
    base = base.removeprefix("void ")
    return base if len(base) <= width else base[: width - 1] + "…"


def _rank_kernels(trace: Trace, k: Kernels, top: int) -> RankKernels:
    # Per (name, kind) key, accumulated ``BLOCK`` kernels at a time (one block: the plain sums, as ever)
    size = 4 * len(trace.names) + 4
    count, total = np.zeros(size, dtype=np.int64), np.zeros(size)
    lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
    sums: dict[int, float] = {}
    for start in range(0, len(k), timeline.BLOCK):
        block = slice(start, start + timeline.BLOCK)
        dur, kind = k.end_at(block) - k.ts_at(block), k.kind[block]
        for kk in KernelKind:
            mask = kind == int(kk)
            if mask.any():
                sums[int(kk)] = sums.get(int(kk), 0.0) + float(dur[mask].sum())
        key = k.name[block].astype(np.int32) * 4 + kind
        count += np.bincount(key, minlength=size)
        total += np.bincount(key, weights=dur, minlength=size)
        np.minimum.at(lo, key, dur)
        np.maximum.at(hi, key, dur)
    uniq = np.flatnonzero(count)
    stats = [
        KernelStat(trace.rank, KernelKind(int(u % 4)).name, trace.names[int(u // 4)], int(count[u]), float(total[u]),
                   float(total[u] / count[u]), float(lo[u]), float(hi[u]))
        for u in uniq[np.argsort(-total[uniq], kind="stable")[:top]].tolist()
    ]
    by_name = {kk.name: sums[int(kk)] for kk in KernelKind if int(kk) in sums}
    return RankKernels(trace.rank, exclusive_kinds(k), by_name, tuple(stats))


def kernel_breakdown(
    data: Job | Trace | JobView, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False, top: int = 10
) -> KernelBreakdown:
    """Kernel-type breakdown and the ``top`` kernels by total time, per rank.

    Example::

        kb = kernel_breakdown(load_trace("rank0.json.gz"), top=5)
        print(kb.ranks[0].exclusive_us, kb.ranks[0].top[0].name)
    """
    view = as_view(data, mode=mode, include_last_step=include_last_step)
    ranks = tuple(_rank_kernels(t, view.kernels(t), top) for t in view.traces)
    return KernelBreakdown(mode=view.mode.value, ranks=ranks)


@plugin("analysis", "kernels")
class KernelTypes:
    """Kernel-type breakdown (computation / communication / memory and overlaps) and top kernels per rank."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        top: int = 10
        """How many kernels to list per rank, by total time."""

        def __post_init__(self) -> None:
            AnalysisConfig.__post_init__(self)
            if self.top < 0:
                raise ValueError(f"top must be >= 0, got {self.top}")

    order = 40

    @staticmethod
    def run(view: JobView, config: Config) -> KernelBreakdown:
        return kernel_breakdown(view, mode=config.mode, include_last_step=config.include_last_step, top=config.top)
