"""Collectives per rank, type and process group: count, time, message size, algorithm and bus bandwidth;
for multi-rank jobs, each collective's time split into waiting for the slowest peer and transfer.

The same collective is matched across ranks by order within its (type, process group); the kernel END
times of one collective agree across ranks (it finishes together everywhere), so each rank's clock offset
is the median difference of matched end times, and after removing it the latest start is when the last
peer arrived: time before it is wait, time after it transfer.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section, as_view, jsonable
from fedge.profiler.kinds import (
    KernelKind,
    Mode,
    canonical_collective,
    collective_of_kernel,
    collective_of_op,
    dtype_bytes,
    dtype_of_kernel,
)
from fedge.profiler.timeline import Kernels, has_last_step, launch_rows
from fedge.profiler.trace import ANNOTATION, CPU_OP, Job, Trace
from fedge.registry import plugin

__all__ = ["CollectiveOp", "CollectiveStat", "CollectiveStats", "Collectives", "RankWait", "collective_ops", "collectives", "match_collectives"]


@dataclass(frozen=True, slots=True)
class CollectiveOp:
    """One collective as it ran on one rank. ``start_us``/``end_us`` are absolute (base time added);
    ``size_bytes`` is the nccl-tests message size (None when the trace does not say)."""

    rank: int
    collective: str
    group: str
    group_size: int | None
    start_us: float
    end_us: float
    size_bytes: int | None
    size_source: str


@dataclass(frozen=True, slots=True)
class CollectiveStat:
    """All collectives of one type and process group on one rank. Bandwidths in GB/s (1e9 B/s) over the
    whole kernel time (which includes waiting for peers); None when the size is unknown."""

    rank: int
    collective: str
    group: str
    count: int
    total_us: float
    mean_us: float
    total_bytes: int | None
    mean_bytes: float | None
    algbw_gbps: float | None
    busbw_gbps: float | None
    size_source: str


@dataclass(frozen=True, slots=True)
class RankWait:
    """Per rank, over the collectives matched across ranks: time waiting for the last peer vs transferring."""

    rank: int
    matched: int
    wait_us: float
    transfer_us: float


@dataclass(frozen=True, slots=True)
class CollectiveStats(Result):
    """Collective statistics per rank, and the wait/transfer split for multi-rank jobs."""

    mode: str
    rows: tuple[CollectiveStat, ...]
    wait: tuple[RankWait, ...]

    def report_fields(self) -> dict[str, object]:
        return {"collectives": self.to_rows(), "collective_wait": jsonable(self.wait)}

    def sections(self) -> list[Section]:
        stats = (Column("rank", "rank"), Column("collective", "collective"), Column("group", "group"),
                 Column("count", "count"), Column("total_us", "total ms", "ms"), Column("mean_us", "mean us"),
                 Column("mean_bytes", "mean bytes"), Column("algbw_gbps", "algbw GB/s"), Column("busbw_gbps", "busbw GB/s"))
        wait = (Column("rank", "rank"), Column("matched", "matched"), Column("wait_us", "wait ms", "ms"),
                Column("transfer_us", "transfer ms", "ms"))
        out = [Section("Collectives", stats, tuple(self.to_rows()))] if self.rows else []
        if self.wait:
            out.append(Section("Collective wait vs transfer", wait, tuple(jsonable(self.wait))))
        return out


def _bus_factor(collective: str, n: int | None) -> float | None:
    if not n or n < 1:
        return None
    if collective == "all_reduce":
        return 2.0 * (n - 1) / n
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


def _nelems(dims: Any) -> int | None:
    """Elements of the first non-empty shape in an ``Input Dims`` list."""
    if not isinstance(dims, list):
        return None
    for shape in dims:
        if isinstance(shape, list) and shape and all(isinstance(x, int) for x in shape):
            return math.prod(shape)
    return None


def _first_type(types: Any) -> str | None:
    if isinstance(types, list):
        for t in types:
            if isinstance(t, str) and dtype_bytes(t):
                return t
    return None


def _group_size(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return len(re.findall(r"\d+", value)) or None
    return None


class _Context:
    """Collective CPU ops of one trace per thread, to find the op a kernel was launched from."""

    def __init__(self, trace: Trace) -> None:
        cpu = trace.cpu
        coll = trace.collective_names[cpu.name]
        rows = np.flatnonzero(coll & ((cpu.cat == CPU_OP) | (cpu.cat == ANNOTATION)))
        self.by_tid: dict[int, tuple[list[float], list[float], list[int]]] = {}
        for tid in np.unique(cpu.tid[rows]):
            r = rows[cpu.tid[rows] == tid]
            r = r[np.argsort(cpu.ts_at(r), kind="stable")]
            self.by_tid[int(tid)] = (cpu.ts_at(r).tolist(), cpu.end_at(r).tolist(), r.tolist())

    def enclosing(self, tid: int, t: float) -> list[int]:
        """Rows of the collective ops on thread ``tid`` that contain time ``t``, innermost first."""
        found = self.by_tid.get(tid)
        if found is None:
            return []
        ts, end, rows = found
        i = bisect.bisect_right(ts, t) - 1
        # Nested ops of one collective (c10d::, record_param_comms, nccl:) are adjacent in start order.
        return [rows[j] for j in range(i, max(i - 8, -1), -1) if end[j] >= t]


def _describe(trace: Trace, kernel_name: str | None, sources: list[dict[str, Any]], op_names: list[str]) -> tuple[str, str, int | None, int | None, str]:
    """(collective, group, group size, size bytes, size source) from kernel name, args and CPU op names."""
    collective = collective_of_kernel(kernel_name) if kernel_name else "unknown"
    from_ops = [collective_of_op(n) for n in op_names if n != "record_param_comms"]
    from_ops = [c for c in from_ops if c != "unknown"]
    named = next((canonical_collective(str(a["Collective name"])) for a in sources if a.get("Collective name")), None)
    if collective in ("unknown", "send_recv") and (named or from_ops):
        collective = named or from_ops[0]
    group_bits = next(
        ((a.get("Process Group Name"), a.get("Process Group Description")) for a in sources if "Process Group Name" in a),
        (None, None),
    )
    group = " ".join(str(b) for b in group_bits if b not in (None, "")) or "default"
    group_size = next((_group_size(a["Group size"]) for a in sources if "Group size" in a), None)
    if group_size is None:
        group_size = next((_group_size(a["Process Group Ranks"]) for a in sources if "Process Group Ranks" in a), None)
    if group_size is None:
        group_size = trace.world_size
    size, source = None, "unknown"
    for a in sources:
        if isinstance(a.get("In msg nelems"), int) and dtype_bytes(str(a.get("dtype", ""))):
            elem = dtype_bytes(str(a["dtype"])) or 0
            nel = a["Out msg nelems"] if collective == "all_gather" and isinstance(a.get("Out msg nelems"), int) else a["In msg nelems"]
            size, source = int(nel) * elem, "args"
            break
    if size is None:
        for a in sources:
            nel = _nelems(a.get("Input Dims"))
            elem = dtype_bytes(_first_type(a.get("Input type"))) or dtype_bytes(dtype_of_kernel(kernel_name or ""))
            if nel and elem:
                size = nel * elem * (group_size or 1 if collective == "all_gather" else 1)
                source = "input dims"
                break
    return collective, group, group_size, size, source


def collective_ops(view: JobView, trace: Trace) -> list[CollectiveOp]:
    """Every collective of one rank of ``view``, in start order: its communication kernels, or for a trace with
    no GPU activity its CPU collective ops (``gloo:all_reduce``... where present, else ``c10d::*``)."""
    return list(view.derive("collective_ops", trace, lambda: _collective_ops(trace, view.kernels(trace), view.include_last_step)))


def _collective_ops(trace: Trace, k: Kernels, include_last_step: bool) -> list[CollectiveOp]:
    ops: list[CollectiveOp] = []
    ctx = _Context(trace)
    cpu = trace.cpu
    if trace.has_gpu:
        comm = np.flatnonzero(k.kind == int(KernelKind.COMMUNICATION))
        gpu_rows = k.row[comm]
        launches = launch_rows(trace, trace.gpu.corr[gpu_rows])
        launch_ts = np.full(len(launches), np.nan)
        launch_ts[launches >= 0] = cpu.ts_at(launches[launches >= 0])
        for i, row, launch, at in zip(comm, gpu_rows, launches, launch_ts.tolist()):
            sources: list[dict[str, Any]] = []
            if ("gpu", int(row)) in trace.comm_args:
                sources.append(trace.comm_args[("gpu", int(row))])
            op_names: list[str] = []
            if launch >= 0:
                for r in ctx.enclosing(int(cpu.tid[launch]), at):
                    op_names.append(trace.names[cpu.name[r]])
                    if ("cpu", r) in trace.comm_args:
                        sources.append(trace.comm_args[("cpu", r)])
            name = trace.names[int(k.name[i])]
            coll, group, n, size, source = _describe(trace, name, sources, op_names)
            ops.append(CollectiveOp(trace.rank, coll, group, n, float(k.ts_at(i)) + trace.base_us,
                                    float(k.end_at(i)) + trace.base_us, size, source))
        return ops
    rows = [r for v in ctx.by_tid.values() for r in v[2]]
    executing = [r for r in rows if not trace.names[cpu.name[r]].startswith(("c10d::", "record_param_comms"))]
    rows = executing or [r for r in rows if trace.names[cpu.name[r]].startswith("c10d::")]
    steps = trace.steps
    limit = steps[:, 0].max() if has_last_step(steps) and not include_last_step else math.inf
    start, end = dict(zip(rows, cpu.ts_at(rows).tolist())), dict(zip(rows, cpu.end_at(rows).tolist()))
    for r in sorted(rows, key=start.__getitem__):
        if start[r] >= limit:
            continue
        name = trace.names[cpu.name[r]]
        sources = [trace.comm_args[("cpu", r)]] if ("cpu", r) in trace.comm_args else []
        coll, group, n, size, source = _describe(trace, None, sources, [name])
        ops.append(CollectiveOp(trace.rank, coll, group, n, start[r] + trace.base_us, end[r] + trace.base_us, size, source))
    return ops


@dataclass(frozen=True, slots=True)
class Matched:
    """One (collective, group) matched across ranks: arrays of shape (ranks, ops), clock-aligned."""

    collective: str
    group: str
    ranks: tuple[int, ...]
    start: np.ndarray
    end: np.ndarray


def match_collectives(per_rank: dict[int, list[CollectiveOp]]) -> list[Matched]:
    """Line up the i-th collective of each (type, group) across the ranks that ran it, and remove each rank's
    clock offset (median difference of end times to the lowest rank)."""
    keyed: dict[tuple[str, str], dict[int, list[CollectiveOp]]] = defaultdict(dict)
    for rank, ops in per_rank.items():
        for op in ops:
            keyed[(op.collective, op.group)].setdefault(rank, []).append(op)
    raw = []
    for (coll, group), by_rank in sorted(keyed.items()):
        if len(by_rank) < 2:
            continue
        ranks = tuple(sorted(by_rank))
        n = min(len(by_rank[r]) for r in ranks)
        start = np.array([[op.start_us for op in by_rank[r][:n]] for r in ranks])
        end = np.array([[op.end_us for op in by_rank[r][:n]] for r in ranks])
        raw.append((coll, group, ranks, start, end))
    offsets: dict[int, list[np.ndarray]] = defaultdict(list)
    for _, _, ranks, start, end in raw:
        for j, r in enumerate(ranks):
            offsets[r].append(end[j] - end[0])
    rank_offset: dict[int, float] = {}
    ref = min((ranks[0] for _, _, ranks, _, _ in raw), default=0)
    for r, diffs in offsets.items():
        rank_offset[r] = float(np.median(np.concatenate(diffs))) if r != ref else 0.0
    out = []
    for coll, group, ranks, start, end in raw:
        shift = np.array([[rank_offset.get(r, 0.0)] for r in ranks])
        out.append(Matched(coll, group, ranks, start - shift, end - shift))
    return out


def collectives(
    data: Job | Trace | JobView, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False
) -> CollectiveStats:
    """Collective statistics per rank, type and process group, plus the wait/transfer split across ranks.

    Example::

        stats = collectives(load_job("traces/"))
        for row in stats.to_rows():
            print(row["rank"], row["collective"], row["count"], row["busbw_gbps"])
    """
    view = as_view(data, mode=mode, include_last_step=include_last_step)
    per_rank = {t.rank: collective_ops(view, t) for t in view.traces}
    rows: list[CollectiveStat] = []
    for rank, ops in per_rank.items():
        groups: dict[tuple[str, str], list[CollectiveOp]] = defaultdict(list)
        for op in ops:
            groups[(op.collective, op.group)].append(op)
        for (coll, group), members in sorted(groups.items()):
            total = sum(op.end_us - op.start_us for op in members)
            sized = [op for op in members if op.size_bytes is not None]
            total_bytes = sum(op.size_bytes or 0 for op in sized) if len(sized) == len(members) else None
            algbw = total_bytes / total * 1e-3 if total_bytes is not None and total > 0 else None
            factor = _bus_factor(coll, members[0].group_size)
            rows.append(CollectiveStat(
                rank, coll, group, len(members), total, total / len(members), total_bytes,
                total_bytes / len(members) if total_bytes is not None else None, algbw,
                algbw * factor if algbw is not None and factor is not None else None,
                members[0].size_source if total_bytes is not None else "unknown",
            ))
    wait: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for m in match_collectives(per_rank):
        latest = m.start.max(axis=0)
        dur = m.end - m.start
        w = np.minimum(dur, np.clip(latest - m.start, 0.0, None))
        for j, r in enumerate(m.ranks):
            acc = wait[r]
            acc[0] += m.start.shape[1]
            acc[1] += float(w[j].sum())
            acc[2] += float((dur[j] - w[j]).sum())
    waits = tuple(RankWait(r, int(v[0]), v[1], v[2]) for r, v in sorted(wait.items()))
    return CollectiveStats(mode=view.mode.value, rows=tuple(rows), wait=waits)


@plugin("analysis", "collectives")
class Collectives:
    """Collectives per type and process group: count, time, bytes, algbw/busbw, wait vs transfer across ranks."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        pass

    order = 50

    @staticmethod
    def run(view: JobView, config: Config) -> CollectiveStats:
        return collectives(view, mode=config.mode, include_last_step=config.include_last_step)
