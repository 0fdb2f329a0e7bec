"""What the analyses share: the kernels of one rank under a mode (classified, step-filtered, rounded the way
that mode says) and interval arithmetic over them (merge, union, intersection, exclusive-kind sweep).

Definitions follow Holistic Trace Analysis (HTA): when a rank has two or more ``ProfilerStep#N``, GPU kernels
whose launch starts at/after the start of the last step are dropped (that step is usually cut short by the
profiler window); time is measured on the union of intervals across streams, never on sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.profiler.kinds import TB_PROFILER_COLLECTIVES, KernelKind, Mode, classify_kernel
from fedge.profiler.trace import ANNOTATION, CPU_OP, GPU_ANNOTATION, KERNEL, MEMCPY, MEMSET, Trace

__all__ = [
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


@dataclass(frozen=True, slots=True)
class Kernels:
    """GPU events of one rank kept under a mode: start/end (µs), kind (``KernelKind`` values), stream,
    name index, and the row in ``trace.gpu``."""

    ts: np.ndarray
    end: np.ndarray
    kind: np.ndarray
    stream: np.ndarray
    name: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    def of(self, kind: KernelKind) -> tuple[np.ndarray, np.ndarray]:
        """Start and end arrays of the events of one kind."""
        mask = self.kind == int(kind)
        return self.ts[mask], self.end[mask]


def merge(ts: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge intervals into disjoint sorted ones; touching intervals merge (as HTA does)."""
    if len(ts) == 0:
        return ts, end
    order = np.argsort(ts, kind="stable")
    s, e = ts[order], end[order]
    reach = np.maximum.accumulate(e)
    new = np.empty(len(s), dtype=bool)
    new[0] = True
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.r_[first[1:] - 1, len(s) - 1]
    return s[first], reach[last]


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
    times, deltas = [], []
    for kind in KernelKind:
        s, e = merge(*k.of(kind))
        bit = 1 << int(kind)
        times += [s, e]
        deltas += [np.full(len(s), bit, dtype=np.int8), np.full(len(e), -bit, dtype=np.int8)]
    t = np.concatenate(times)
    d = np.concatenate(deltas)
    order = np.argsort(t, kind="stable")
    t, d = t[order], d[order]
    running = np.cumsum(d, dtype=np.int8)  # a bit mask of the kinds running: 0..7
    seg = np.diff(t, append=t[-1] if len(t) else 0.0)
    out: dict[str, float] = {}
    for mask in np.unique(running):
        if mask <= 0:
            continue
        label = " overlapping ".join(kind.name for kind in KernelKind if int(mask) & (1 << int(kind)))
        out[label] = float(seg[running == mask].sum())
    return out


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


def _kinds_of_names(trace: Trace, mode: Mode) -> np.ndarray:
    """Kind of each (name, is-memory-event) pair, computed once per distinct name."""
    gpu = trace.gpu
    is_mem = (gpu.cat == MEMCPY) | (gpu.cat == MEMSET)
    key = gpu.name.astype(np.int64) * 2 + is_mem
    uniq, inverse = np.unique(key, return_inverse=True)
    kinds = np.array(
        [int(classify_kernel(trace.names[u // 2], is_memory_event=bool(u % 2), mode=mode)) for u in uniq],
        dtype=np.int8,
    )
    return kinds[inverse] if len(uniq) else np.empty(0, dtype=np.int8)


def tb_profiler_comm_ops(trace: Trace) -> np.ndarray:
    """``cpu`` rows of the collective ops torch-tb-profiler knows (``TB_PROFILER_COLLECTIVES``), in start order;
    their GPU-track copies (``gpu_user_annotation``) count there as ops of their own."""
    cpu = trace.cpu
    known = np.array([n in TB_PROFILER_COLLECTIVES for n in trace.names] or [False], dtype=bool)
    rows = np.flatnonzero(known[cpu.name] & np.isin(cpu.cat, (CPU_OP, ANNOTATION, GPU_ANNOTATION)))
    return rows[np.argsort(cpu.ts[rows], kind="stable")]


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
    gpu, cpu = trace.gpu, trace.cpu
    if mode is Mode.HTA:
        ts, end = np.ceil(gpu.ts), np.floor(gpu.ts + gpu.dur)
    else:
        ts, end = gpu.ts, gpu.ts + gpu.dur
    keep = np.ones(len(gpu), dtype=bool)
    steps = trace.steps if mode is Mode.FEDGE else np.concatenate([trace.steps, trace.gpu_steps])
    if mode is not Mode.TB_PROFILER and has_last_step(steps):
        if mode is Mode.HTA:
            step_start, step_end = np.ceil(steps[:, 0]), np.floor(steps[:, 0] + steps[:, 1])
        else:
            step_start, step_end = steps[:, 0], steps[:, 0] + steps[:, 1]
        launch = launch_rows(trace, gpu.corr)
        has = launch >= 0
        launch_ts = np.full(len(gpu), np.inf)
        launch_ts[has] = cpu.ts[launch[has]]
        if mode is Mode.HTA:
            launch_ts = np.ceil(launch_ts)
        keep = (launch_ts <= step_end.max()) if include_last_step else (launch_ts < step_start.max())
        if mode is Mode.FEDGE:  # kernels whose launch is outside the trace: judge them by their own start
            limit = step_end.max() if include_last_step else step_start.max()
            keep |= ~has & (gpu.ts < limit)
    rows = np.flatnonzero(keep)
    kind = _tb_profiler_kinds(trace) if mode is Mode.TB_PROFILER else _kinds_of_names(trace, mode)
    return Kernels(ts=ts[rows], end=end[rows], kind=kind[rows], stream=gpu.tid[rows], name=gpu.name[rows], row=rows)


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
        keep &= (cpu.ts <= limit) if include_last_step else (cpu.ts < limit)
    end = cpu.ts + cpu.dur
    comp = keep & ~coll & (cpu.cat == CPU_OP)
    comm = keep & coll
    return {"compute": (cpu.ts[comp], end[comp]), "comm": (cpu.ts[comm], end[comm])}
