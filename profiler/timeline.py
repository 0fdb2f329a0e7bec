"""What the analyses share: the kernels of one rank under a mode (classified, step-filtered, rounded the way
that mode says) and interval arithmetic over them (merge, union, intersection, exclusive-kind sweep).

Definitions follow Holistic Trace Analysis (HTA): when a rank has two or more ``ProfilerStep#N``, GPU kernels
whose launch starts at/after the start of the last step are dropped (that step is usually cut short by the
profiler window); time is measured on the union of intervals across streams, never on sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.profiler.columns import Exact, FloatColumn
from fedge.profiler.kinds import TB_PROFILER_COLLECTIVES, KernelKind, Mode, classify_kernel
from fedge.profiler.trace import ANNOTATION, CPU_OP, GPU_ANNOTATION, KERNEL, MEMCPY, MEMSET, Trace

__all__ = [
    "BLOCK",
    "Kernels",
    "cpu_intervals",
    "exclusive_kinds",
    "has_last_step",
    "intersection_us",
    "kernels",
    "launch_rows",
    "merge",
    "tb_profiler_comm_ops",
    "union_us",
]


#: Intervals handled at a time by the sweeps over one rank's kernels: what bounds their memory on multi-GB
#: traces. A rank with fewer events is swept in one piece, exactly as ever.
BLOCK = 1 << 16


@dataclass(frozen=True, slots=True)
class Kernels:
    """GPU events of one rank kept under a mode: start/end (µs, float64; stored compactly like the trace's
    columns, so each access decodes: take a subset with ``ts_at``/``end_at``), kind (``KernelKind`` values),
    stream, name index, the row in ``trace.gpu``, and ``by_ts``, the events in (start, row) order."""

    ts_exact: Exact
    end_exact: Exact
    kind: np.ndarray
    stream: np.ndarray
    name: np.ndarray
    row: np.ndarray
    by_ts: np.ndarray

    def __len__(self) -> int:
        return len(self.kind)

    @property
    def ts(self) -> np.ndarray:
        """Start of every event (µs)."""
        return self.ts_exact.get()

    @property
    def end(self) -> np.ndarray:
        """End of every event (µs)."""
        return self.end_exact.get()

    def ts_at(self, rows: Any) -> Any:
        """Starts of ``rows`` (an index, index array, mask or slice) without decoding the whole column."""
        return self.ts_exact.get(rows)

    def end_at(self, rows: Any) -> Any:
        return self.end_exact.get(rows)

    def of(self, kind: KernelKind) -> tuple[np.ndarray, np.ndarray]:
        """Start and end arrays of the events of one kind."""
        mask = self.kind == int(kind)
        return self.ts_at(mask), self.end_at(mask)

    def _order(self, kinds: tuple[KernelKind, ...]) -> np.ndarray:
        if not kinds:
            return self.by_ts
        per_kind = [self.by_ts[self.kind[self.by_ts] == int(k)] for k in kinds]
        if len(per_kind) == 1:
            return per_kind[0]
        # (start, kind order, row), as union_us of the kinds' concatenated intervals takes them
        joined = np.concatenate(per_kind)
        return joined[np.argsort(self.ts_at(joined), kind="stable")]

    def merged_blocks(self, *kinds: KernelKind) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The merged intervals of the events of ``kinds`` (of all events when none), in time order, ``BLOCK``
        events at a time: the same intervals :func:`merge` gives, in bounded memory. Each block is (starts,
        ends, positions): where each interval's first event is in ``by_ts`` (when no kinds are given)."""
        order = self._order(kinds)
        carry: tuple[float, float, int] | None = None
        for lo in range(0, len(order), BLOCK):
            o = order[lo : lo + BLOCK]
            s, e = self.ts_at(o), self.end_at(o)
            if carry is not None:  # the group still open at the end of the last block goes on here
                s, e = np.r_[carry[0], s], np.r_[carry[1], e]
            s, e, first = _merge_sorted(s, e)
            pos = first + (lo if carry is None else lo - 1)
            if carry is not None:
                pos[0] = carry[2]
            if lo + BLOCK < len(order):
                carry = (float(s[-1]), float(e[-1]), int(pos[-1]))
                s, e, pos = s[:-1], e[:-1], pos[:-1]
            yield s, e, pos

    def merged(self, *kinds: KernelKind) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`merged_blocks` as two arrays."""
        parts = [p[:2] for p in self.merged_blocks(*kinds)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty(0), np.empty(0)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def union_us(self, *kinds: KernelKind) -> float:
        """Length of the union of the events of ``kinds`` (of all events when none): ``union_us`` of them.

        Events of several kinds are taken in (start, kind order, row) order, as ``union_us`` of the
        concatenated intervals would take them (the order of equal starts only matters for intervals that end
        before they start: HTA mode rounds sub-µs kernels into those)."""
        if len(kinds) > 1 and len(self) <= BLOCK:
            parts = [self.of(k) for k in kinds]
            return union_us(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        total = 0.0
        for s, e, _ in self.merged_blocks(*kinds):
            total += float(np.sum(e - s))
        return total


def _merge_sorted(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`merge` of intervals already in stable start order, plus the index of each merged interval's first
    one; ``e`` (a copy the caller owns) is overwritten."""
    if len(s) == 0:
        return s, e, np.empty(0, dtype=np.int64)
    np.maximum.accumulate(e, out=e)  # e is now how far the intervals so far reach
    new = np.empty(len(s), dtype=bool)
    new[0] = True
    np.greater(s[1:], e[:-1], out=new[1:])
    first = np.flatnonzero(new)
    del new
    ends = np.empty(len(first), dtype=e.dtype)
    ends[:-1] = e[first[1:] - 1]
    ends[-1] = e[-1]
    return s[first], ends, first


def merge(ts: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge intervals into disjoint sorted ones; touching intervals merge (as HTA does)."""
    if len(ts) == 0:
        return ts, end
    order = np.argsort(ts, kind="stable")
    s, e = ts[order], end[order]
    del order
    return _merge_sorted(s, e)[:2]


def union_us(ts: np.ndarray, end: np.ndarray) -> float:
    """Length of the union of the intervals."""
    s, e = merge(ts, end)
    return float(np.sum(e - s))


def intersection_us(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Length of (union of a) ∩ (union of b), as |A| + |B| - |A ∪ B|."""
    both = (np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    return union_us(*a) + union_us(*b) - union_us(*both)


def exclusive_kinds(k: Kernels) -> dict[str, float]:
    """Time during which exactly each combination of kinds runs, HTA's kernel-type breakdown
    (``"COMPUTATION overlapping COMMUNICATION"``...). Keys list kinds in enum order."""
    if len(k) <= BLOCK:
        t, d = _boundaries([k.merged(kind) for kind in KernelKind])
        running = np.cumsum(d, dtype=np.int8)  # a bit mask of the kinds running: 0..7
        seg = np.diff(t, append=t[-1] if len(t) else 0.0)
        return {_label(int(m)): float(seg[running == m].sum()) for m in np.unique(running) if m > 0}
    # Millions of kernels: the same sweep a time window at a time (cut at every BLOCK-th kernel start)
    out: dict[str, float] = {}
    streams = [_Boundaries(k.merged_blocks(kind)) for kind in KernelKind]
    running, last_t = 0, None
    for cut in [*np.unique(k.ts_at(k.by_ts[BLOCK::BLOCK])).tolist(), None]:
        t, d = _boundaries([stream.take(cut) for stream in streams])
        if not len(t):
            continue
        if last_t is not None and running > 0:  # the segment from the last window's last boundary to here
            _add(out, running, float(t[0]) - last_t)
        d[0] += running
        run = np.cumsum(d, dtype=np.int8)
        seg = np.diff(t)
        for m in np.unique(run[:-1]):
            if m > 0:
                _add(out, int(m), float(seg[run[:-1] == m].sum()))
        running, last_t = int(run[-1]), float(t[-1])
    return out


class _Boundaries:
    """One kind's merged starts and ends, read a block at a time and taken a time window at a time."""

    def __init__(self, blocks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        self.blocks = blocks
        self.s = self.e = np.empty(0)
        self.done = False

    def take(self, cut: float | None) -> tuple[np.ndarray, np.ndarray]:
        """The starts and ends before ``cut`` not taken yet (all that remain when ``cut`` is None)."""
        while not self.done and (cut is None or not len(self.s) or self.s[-1] < cut or not len(self.e) or self.e[-1] < cut):
            block = next(self.blocks, None)
            if block is None:
                self.done = True
            else:
                self.s, self.e = np.concatenate([self.s, block[0]]), np.concatenate([self.e, block[1]])
        i = len(self.s) if cut is None else int(np.searchsorted(self.s, cut))
        j = len(self.e) if cut is None else int(np.searchsorted(self.e, cut))
        taken = self.s[:i], self.e[:j]
        self.s, self.e = self.s[i:], self.e[j:]
        return taken


def _boundaries(merged: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of each kind's merged intervals in time order, with the bit each turns on (+) or off (-)."""
    times, deltas = [], []
    for kind, (s, e) in zip(KernelKind, merged):
        bit = 1 << int(kind)
        times += [s, e]
        deltas += [np.full(len(s), bit, dtype=np.int8), np.full(len(e), -bit, dtype=np.int8)]
    t, d = np.concatenate(times), np.concatenate(deltas)
    del times, deltas
    order = np.argsort(t, kind="stable")
    return t[order], d[order]


def _label(mask: int) -> str:
    return " overlapping ".join(kind.name for kind in KernelKind if mask & (1 << int(kind)))


def _add(out: dict[str, float], mask: int, us: float) -> None:
    label = _label(mask)
    out[label] = out.get(label, 0.0) + us


def launch_rows(trace: Trace, corr: np.ndarray) -> np.ndarray:
    """The cpu row of the launch of each correlation id, -1 where none was recorded."""
    keys, rows = trace.launch_corr, trace.launch_row
    if len(keys) == 0:
        return np.full(len(corr), -1, dtype=np.int64)
    pos = np.clip(np.searchsorted(keys, corr), 0, len(keys) - 1)
    return np.where((keys[pos] == corr) & (corr >= 0), rows[pos], -1)


def has_last_step(steps: np.ndarray) -> bool:
    """Whether a step table (``Trace.steps`` rows ``(ts, dur, number)``) has a last step to drop: HTA's rule,
    two or more distinct ``ProfilerStep#N``."""
    return len(np.unique(steps[:, 2])) >= 2


def _kinds_of_names(trace: Trace, mode: Mode, rows: np.ndarray) -> np.ndarray:
    """Kind of the GPU events at ``rows``, classified once per distinct (name, is-memory-event) pair."""
    gpu = trace.gpu
    cat = gpu.cat[rows]
    key = gpu.name[rows].astype(np.int32) * 2 + ((cat == MEMCPY) | (cat == MEMSET))
    del cat
    present = np.zeros(2 * len(trace.names) + 2, dtype=bool)
    present[key] = True
    table = np.zeros(len(present), dtype=np.int8)
    for u in np.flatnonzero(present).tolist():
        table[u] = int(classify_kernel(trace.names[u // 2], is_memory_event=bool(u % 2), mode=mode))
    return table[key]


def tb_profiler_comm_ops(trace: Trace) -> np.ndarray:
    """``cpu`` rows of the collective ops torch-tb-profiler knows (``TB_PROFILER_COLLECTIVES``), in start order;
    their GPU-track copies (``gpu_user_annotation``) count there as ops of their own."""
    cpu = trace.cpu
    known = np.array([n in TB_PROFILER_COLLECTIVES for n in trace.names] or [False], dtype=bool)
    rows = np.flatnonzero(known[cpu.name] & np.isin(cpu.cat, (CPU_OP, ANNOTATION, GPU_ANNOTATION)))
    return rows[np.argsort(cpu.ts_at(rows), kind="stable")]


def _tb_profiler_kinds(trace: Trace) -> np.ndarray:
    """torch-tb-profiler's kinds: a kernel of one of its collective ops (by ``External id``) communicates,
    memcpy/memset move memory, every other kernel computes (so an all_to_all's kernels compute there)."""
    gpu = trace.gpu
    comm_ext = np.unique(trace.cpu.ext[tb_profiler_comm_ops(trace)])
    kind = np.full(len(gpu), int(KernelKind.COMPUTATION), dtype=np.int8)
    kind[(gpu.cat == KERNEL) & np.isin(gpu.ext, comm_ext)] = int(KernelKind.COMMUNICATION)
    kind[(gpu.cat == MEMCPY) | (gpu.cat == MEMSET)] = int(KernelKind.MEMORY)
    return kind


def kernels(trace: Trace, mode: Mode | str = Mode.FEDGE, *, include_last_step: bool = False) -> Kernels:
    """The GPU events of ``trace`` that the analyses use under ``mode``.

    hta: timestamps rounded as HTA 0.5.0 does (start up, end down, to whole µs); a step is any
    ``ProfilerStep#N`` name on either track; kernels are kept when their launch (matched by correlation id)
    starts before the last step. fedge: exact timestamps; steps from the CPU track only; a kernel whose
    launch was not recorded is kept when it starts before the last step. tb-profiler: exact timestamps, every
    step kept (as torch-tb-profiler does), kinds from ``External id`` (see ``_tb_profiler_kinds``).
    """
    mode = Mode(mode)
    gpu = trace.gpu
    rows = _kept_rows(trace, mode, include_last_step)
    starts, ends = FloatColumn(relative=True), FloatColumn(relative=True)
    for lo in range(0, len(rows), BLOCK):
        block = rows[lo : lo + BLOCK]
        ts, end = gpu.ts_at(block), gpu.end_at(block)  # fresh arrays (an index array): rounded in place
        if mode is Mode.HTA:
            np.ceil(ts, out=ts)
            np.floor(end, out=end)
        starts.extend(ts)  # type: ignore[arg-type]
        ends.extend(end)  # type: ignore[arg-type]
    ts_exact, end_exact = starts.finish(), ends.finish()
    # Stable order of the starts: of the stored integers where they decode one to one (whole µs), which
    # needs no decoded copy of the column
    by_ts = np.argsort(ts_exact.raw if ts_exact.scale == 1 else ts_exact.get(), kind="stable").astype(rows.dtype)
    kind = _tb_profiler_kinds(trace)[rows] if mode is Mode.TB_PROFILER else _kinds_of_names(trace, mode, rows)
    return Kernels(ts_exact=ts_exact, end_exact=end_exact, kind=kind, stream=gpu.tid[rows], name=gpu.name[rows],
                   row=rows, by_ts=by_ts)


def _kept_rows(trace: Trace, mode: Mode, include_last_step: bool) -> np.ndarray:
    """Rows of ``trace.gpu`` kept under ``mode`` (see :func:`kernels`), decided ``BLOCK`` events at a time."""
    gpu, cpu = trace.gpu, trace.cpu
    index = np.int32 if len(gpu) < 2**31 else np.int64
    steps = trace.steps if mode is Mode.FEDGE else np.concatenate([trace.steps, trace.gpu_steps])
    if mode is Mode.TB_PROFILER or not has_last_step(steps):
        return np.arange(len(gpu), dtype=index)
    if mode is Mode.HTA:
        step_start, step_end = np.ceil(steps[:, 0]), np.floor(steps[:, 0] + steps[:, 1])
    else:
        step_start, step_end = steps[:, 0], steps[:, 0] + steps[:, 1]
    limit = step_end.max() if include_last_step else step_start.max()
    keep = np.empty(len(gpu), dtype=bool)
    for lo in range(0, len(gpu), BLOCK):
        block = slice(lo, lo + BLOCK)
        launch = launch_rows(trace, gpu.corr[block])
        has = launch >= 0
        launch_ts = np.full(len(launch), np.inf)
        launch_ts[has] = cpu.ts_at(launch[has])
        if mode is Mode.HTA:
            np.ceil(launch_ts, out=launch_ts)
        kept = (launch_ts <= limit) if include_last_step else (launch_ts < limit)
        if mode is Mode.FEDGE:  # kernels whose launch is outside the trace: judge them by their own start
            kept |= ~has & (gpu.ts_at(block) < limit)
        keep[block] = kept
    return np.flatnonzero(keep).astype(index)


def cpu_intervals(
    trace: Trace, *, include_last_step: bool = False, mode: Mode | str = Mode.FEDGE
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For traces without GPU activity: CPU ``compute`` (ops that are not collectives) and ``comm``
    (collective ops such as ``gloo:all_reduce``, ``c10d::allreduce_``) intervals, last step dropped as for
    kernels (tb-profiler mode: only its own collective ops communicate, and every step is kept)."""
    cpu = trace.cpu
    is_op = (cpu.cat == CPU_OP) | (cpu.cat == ANNOTATION)
    if Mode(mode) is Mode.TB_PROFILER:
        coll = np.zeros(len(cpu), dtype=bool)
        coll[tb_profiler_comm_ops(trace)] = True
    else:
        coll = trace.collective_names[cpu.name] & is_op
    step_name = np.array([n.startswith("ProfilerStep") for n in trace.names], dtype=bool)[cpu.name]
    keep = is_op & ~step_name
    steps = trace.steps
    if Mode(mode) is not Mode.TB_PROFILER and has_last_step(steps):
        limit = (steps[:, 0] + steps[:, 1]).max() if include_last_step else steps[:, 0].max()
        ts = cpu.ts
        keep &= (ts <= limit) if include_last_step else (ts < limit)
        del ts
    comp = np.flatnonzero(keep & ~coll & (cpu.cat == CPU_OP))
    comm = np.flatnonzero(keep & coll)
    return {"compute": (cpu.ts_at(comp), cpu.end_at(comp)), "comm": (cpu.ts_at(comm), cpu.end_at(comm))}
