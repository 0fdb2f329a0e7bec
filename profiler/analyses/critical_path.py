"""Critical path of a step, per rank: the chain of CPU work, kernel launches, GPU kernels, collectives and
synchronisations that bounds the step's duration, walked back from the step's last GPU event, with each kind's
share of it.

Walking back from an event, its predecessor on the path is what it waited for:

- a GPU event waited for the previous event on its stream or for its launch, whichever ended later (the gap
  before it is ``kernel_gap`` or ``launch_delay`` time); when it started ``wait_gap_us`` after both, it waited
  for another stream (cudaStreamWaitEvent: an NCCL kernel for the gradients, a copy for its input), and the GPU
  event that ended last before it is its predecessor;
- a launch, and the CPU time before it on its thread, waited for the last synchronisation on that thread in the
  step (``cudaDeviceSynchronize``, ``cudaStreamSynchronize``, ``cudaEventSynchronize``...), which in turn
  waited for the GPU event that ended last before it returned;
- CPU work on another thread than the step's (autograd's backward thread, a data-loader thread) started when
  that thread's burst of work began (ops less than ``thread_gap_us`` apart): before that the path is on the
  step's own thread, which handed the work over;
- on the step's thread, with no synchronisation before, the path starts at the step's start.

The time on the path is split by kind (cpu, launch, sync, kernel, collective, memory, launch_delay,
kernel_gap), so the shares say what the step was waiting on. Holistic Trace Analysis 0.5's
``critical_path_analysis`` builds a graph of the same dependencies (call stacks per thread, launches,
kernel-to-kernel on a stream, CUDA synchronisation events) and takes its longest path; docs/profiler.md compares
the two on the shared traces.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedge.errors import ConfigError
from fedge.profiler import timeline
from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section
from fedge.profiler.kinds import KernelKind, Mode
from fedge.profiler.timeline import Kernels, launch_rows, merge
from fedge.profiler.trace import ANNOTATION, CPU_OP, LAUNCH_CATEGORIES, Trace
from fedge.registry import plugin

__all__ = ["CriticalPath", "CriticalPathAnalysis", "PathLink", "RankPath", "critical_path"]

_SYNC = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaStreamWaitEvent",
         "hipDeviceSynchronize", "hipStreamSynchronize", "hipEventSynchronize", "cuCtxSynchronize",
         "cuStreamSynchronize", "cuEventSynchronize")
_KIND = {int(KernelKind.COMPUTATION): "kernel", int(KernelKind.COMMUNICATION): "collective",
         int(KernelKind.MEMORY): "memory"}
KINDS = ("cpu", "launch", "sync", "kernel", "collective", "memory", "launch_delay", "kernel_gap")


@dataclass(frozen=True, slots=True)
class PathLink:
    """One link of the path (µs): ``kind`` is one of ``KINDS``; ``tid`` the CPU thread or GPU stream."""

    kind: str
    name: str
    start_us: float
    end_us: float
    tid: int = -1


@dataclass(frozen=True, slots=True)
class RankPath:
    """The critical path of one step on one rank, first link first; ``share_pct`` by kind, ``threads`` the CPU
    threads it ran on."""

    rank: int
    step: int
    span_us: float
    links: tuple[PathLink, ...]
    share_pct: dict[str, float] = field(default_factory=dict)
    threads: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CriticalPath(Result):
    """Critical path of a step per rank: what the step waited on, by kind (% of the step)."""

    mode: str
    rows: tuple[RankPath, ...]

    def to_rows(self) -> list[dict[str, object]]:
        return [{"rank": r.rank, "step": r.step, "span_us": round(r.span_us, 3), "links": len(r.links),
                 "threads": len(r.threads), **{f"{k}_pct": round(r.share_pct.get(k, 0.0), 2) for k in KINDS}}
                for r in self.rows]

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode, "rows": self.to_rows(),
                "paths": [{"rank": r.rank, "step": r.step, "links": [[link.kind, link.name, round(link.start_us, 3),
                                                                       round(link.end_us, 3), link.tid] for link in r.links]}
                          for r in self.rows]}

    def sections(self) -> list[Section]:
        title = "Critical path of a step (% of the step by kind)"
        if not self.rows:
            return [Section(title, lines=("no rank has a ProfilerStep with GPU activity to follow",))]
        kinds = [k for k in KINDS if any(r.share_pct.get(k) for r in self.rows)]
        columns = (Column("rank", "rank"), Column("step", "step"), Column("span_us", "step ms", "ms"),
                   Column("links", "links"), *(Column(f"{k}_pct", f"{k.replace('_', ' ')} %") for k in kinds))
        lines = []
        for r in self.rows:
            top = sorted(((link.end_us - link.start_us, link) for link in r.links if link.name), key=lambda x: -x[0])[:3]
            if top:
                lines.append(f"rank {r.rank}, step {r.step}: longest links " + "; ".join(
                    f"{link.kind} {link.name[:60]} {d / 1000:,.2f} ms" for d, link in top))
        return [Section(title, columns, tuple(self.to_rows()), lines=tuple(lines))]


class _Walk:
    """The backward walk over one rank's GPU events and CPU calls, for a step starting at ``start``.

    Every GPU event the walk can return ends after the step's start, so only those are indexed by end, and
    only the CPU calls that reach past the start are read: memory follows the step, not the trace. Launches
    and the previous event on a stream are looked up for the events the walk visits only."""

    def __init__(self, trace: Trace, k: Kernels, start: float, *, thread_gap_us: float, wait_gap_us: float) -> None:
        self.trace, self.k, self.thread_gap_us, self.wait_gap_us = trace, k, thread_gap_us, wait_gap_us
        cpu = trace.cpu
        after = np.flatnonzero(k.end > start)
        self.by_end = after[np.argsort(k.end_at(after), kind="stable")]
        self.ends = k.end_at(self.by_end)
        is_sync = np.array([n.startswith(_SYNC) for n in trace.names] or [False], dtype=bool)
        syncs = _cpu_rows(trace, lambda cat, name, rows: np.isin(cat, LAUNCH_CATEGORIES) & is_sync[name]
                          & (cpu.ts_at(rows) >= start))
        self.syncs = syncs
        self.sync_tid, self.sync_ts, self.sync_end = cpu.tid[syncs], cpu.ts_at(syncs), cpu.end_at(syncs)
        self._launch: dict[int, tuple[int, float, float]] = {}
        self._stream_order: dict[int, np.ndarray] = {}
        # CPU ops that reach the step's start, in bursts per thread (ops ending earlier cannot change a burst
        # that holds a time after it)
        ops = _cpu_rows(trace, lambda cat, name, rows: ((cat == CPU_OP) | (cat == ANNOTATION))
                        & (cpu.end_at(rows) + thread_gap_us >= start))
        self.bursts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for tid in np.unique(cpu.tid[ops]).tolist():
            rows = ops[cpu.tid[ops] == tid]
            self.bursts[tid] = merge(cpu.ts_at(rows), cpu.end_at(rows) + thread_gap_us)

    def launch(self, i: int) -> tuple[int, float, float]:
        """(cpu row, start, end) of the launch of GPU event ``i``; (-1, nan, -inf) when it was not recorded."""
        found = self._launch.get(i)
        if found is None:
            cpu = self.trace.cpu
            row = int(launch_rows(self.trace, self.trace.gpu.corr[self.k.row[i : i + 1]])[0])
            found = (row, float(cpu.ts_at(row)), float(cpu.end_at(row))) if row >= 0 else (-1, np.nan, -np.inf)
            self._launch[i] = found
        return found

    def prev_on_stream(self, i: int) -> int | None:
        """The event before ``i`` on its stream, in (start, index) order."""
        k = self.k
        stream = int(k.stream[i])
        order = self._stream_order.get(stream)
        if order is None:
            order = self._stream_order[stream] = k.by_ts[k.stream[k.by_ts] == stream]
        pos = bisect.bisect_left(order, (float(k.ts_at(i)), i), key=lambda j: (float(k.ts_at(j)), int(j)))
        return int(order[pos - 1]) if pos > 0 else None

    def _last_of_step(self, start: float, end: float) -> int | None:
        """The GPU event launched in the step that ends last (it may end after the step's CPU side)."""
        k, best, best_end = self.k, None, -np.inf
        for lo in range(0, len(k), timeline.BLOCK):
            block = slice(lo, lo + timeline.BLOCK)
            launch = launch_rows(self.trace, self.trace.gpu.corr[k.row[block]])
            launch_ts = np.full(len(launch), np.nan)
            launch_ts[launch >= 0] = self.trace.cpu.ts_at(launch[launch >= 0])
            inside = np.flatnonzero((launch_ts >= start) & (launch_ts < end))
            if len(inside):
                j = int(inside[np.argmax(k.end_at(block)[inside])])
                if best is None or k.end_at(lo + j) > best_end:  # the first of equal ends, as argmax over all
                    best, best_end = lo + j, float(k.end_at(lo + j))
        return best if best is not None else self.last_gpu_before(end, start)

    def last_gpu_before(self, t: float, lo: float) -> int | None:
        i = int(np.searchsorted(self.ends, t, side="right")) - 1
        if i < 0 or self.ends[i] <= lo:
            return None
        return int(self.by_end[i])

    def run(self, start: float, end: float, main_tid: int) -> list[PathLink]:
        k, names = self.k, self.trace.names
        links: list[PathLink] = []
        i = self._last_of_step(start, end)
        cpu_at: tuple[int, float] | None = None
        seen: set[int] = set()
        while i is not None and i not in seen:  # each GPU event once: zero-length events cannot make a cycle
            seen.add(i)
            links.append(PathLink(_KIND.get(int(k.kind[i]), "kernel"), names[int(k.name[i])], max(float(k.ts_at(i)), start),
                                  float(k.end_at(i)), int(k.stream[i])))
            if k.ts_at(i) <= start:  # the step began while this ran
                cpu_at = None
                break
            i, cpu_at = self._before_gpu(i, start, links)
            if cpu_at is not None:
                i = self._before_on_cpu(cpu_at, start, main_tid, links)
                if i is None:
                    cpu_at = None  # the CPU side was followed to the step's start
        return _clip(links)

    def _before_gpu(self, i: int, start: float, links: list[PathLink]) -> tuple[int | None, tuple[int, float] | None]:
        """What GPU event ``i`` waited for: the previous event on its stream, or its launch (then the walk goes
        on on the CPU, returned as (thread, time)); when both were done well before it started, the GPU event on
        another stream that ended last before it (a cross-stream dependency, cudaStreamWaitEvent)."""
        k, cpu, names = self.k, self.trace.cpu, self.trace.names
        ts = float(k.ts_at(i))
        prev = self.prev_on_stream(i)
        launch, launch_ts, launch_end = self.launch(i)
        prev_end = float(k.end_at(prev)) if prev is not None else -np.inf
        ready = max(prev_end, launch_end)
        if ts - ready > self.wait_gap_us:
            other = self.last_gpu_before(ts, max(ready, start))
            if other is not None and k.ts_at(other) < ts and int(k.stream[other]) != int(k.stream[i]):
                links.append(PathLink("kernel_gap", "", float(k.end_at(other)), ts, int(k.stream[i])))
                return other, None
        if prev is not None and prev_end >= launch_end and prev_end > start:
            if ts > prev_end:
                links.append(PathLink("kernel_gap", "", prev_end, ts, int(k.stream[i])))
            return prev, None
        if launch < 0 or launch_ts < start:
            return None, None
        if ts > launch_end:
            links.append(PathLink("launch_delay", "", launch_end, ts, int(k.stream[i])))
        tid = int(cpu.tid[launch])
        links.append(PathLink("launch", names[int(cpu.name[launch])], launch_ts, launch_end, tid))
        return None, (tid, launch_ts)

    def _before_on_cpu(self, at: tuple[int, float], start: float, main_tid: int, links: list[PathLink]) -> int | None:
        """From CPU time ``at`` back to the GPU event the thread last waited for (returned), else to the step's
        start, through the step's thread when ``at`` is on another one (None returned)."""
        cpu, names = self.trace.cpu, self.trace.names
        tid, t = at
        while True:
            found = np.flatnonzero((self.sync_tid == tid) & (self.sync_end <= t) & (self.sync_ts >= start) & (self.sync_ts < t))
            burst = self._burst_start(tid, t, start) if tid != main_tid else start
            if len(found):
                j = int(found[np.argmax(self.sync_end[found])])
                s, s_start, s_end = int(self.syncs[j]), float(self.sync_ts[j]), float(self.sync_end[j])
                if s_end >= burst:
                    if t > s_end:
                        links.append(PathLink("cpu", "", s_end, t, tid))
                    waited = self.last_gpu_before(s_end, s_start)
                    # It waited from its call until that GPU event ended; one that waited for nothing is CPU time
                    links.append(PathLink("sync", names[int(cpu.name[s])], float(self.k.end_at(waited)) if waited is not None
                                          else s_start, s_end, tid))
                    if waited is not None:
                        return waited
                    t = s_start
                    continue
            if t > burst:
                links.append(PathLink("cpu", "", burst, t, tid))
            if tid == main_tid or burst <= start:
                return None
            tid, t = main_tid, burst  # the step's thread handed this work over when the burst began

    def _burst_start(self, tid: int, t: float, start: float) -> float:
        """When the burst of work on ``tid`` that holds time ``t`` began (``t`` itself outside every burst)."""
        s, e = self.bursts.get(tid, (np.empty(0), np.empty(0)))
        i = int(np.searchsorted(s, t, side="right")) - 1
        if i < 0 or e[i] < t:
            return max(t, start)
        return max(float(s[i]), start)


def _clip(links: list[PathLink]) -> list[PathLink]:
    """First link first; each link counts until the next one starts (events of one stream may overlap by a
    rounding or a profiler artefact), so no time is counted twice."""
    clipped: list[PathLink] = []
    for link in links:
        limit = clipped[-1].start_us if clipped else link.end_us
        end = min(link.end_us, limit)
        clipped.append(PathLink(link.kind, link.name, min(link.start_us, end), end, link.tid))
    clipped.reverse()
    return clipped


def _cpu_rows(trace: Trace, keep: Callable[[np.ndarray, np.ndarray, slice], np.ndarray]) -> np.ndarray:
    """Rows of ``trace.cpu`` where ``keep(cat, name, rows)`` holds, tested ``BLOCK`` rows at a time."""
    cpu, found = trace.cpu, []
    for lo in range(0, len(cpu), timeline.BLOCK):
        block = slice(lo, lo + timeline.BLOCK)
        found.append(np.flatnonzero(keep(cpu.cat[block], cpu.name[block], block)) + lo)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _main_tid(trace: Trace, step_ts: float) -> int:
    """The thread that records the step's ``ProfilerStep#N`` (the training loop's)."""
    cpu = trace.cpu
    is_step = np.array([n.startswith("ProfilerStep") for n in trace.names] or [False], dtype=bool)[cpu.name]
    rows = np.flatnonzero(is_step)
    rows = rows[cpu.ts_at(rows) == step_ts]
    return int(cpu.tid[rows[0]]) if len(rows) else -1


def _rank_path(view: JobView, trace: Trace, config: CriticalPathAnalysis.Config) -> RankPath | None:
    steps = trace.steps
    k = view.kernels(trace)
    if len(steps) == 0 or not len(k):
        return None
    # The last complete step: the profiler usually cuts the last ProfilerStep short (HTA drops it too).
    if config.step >= 0:
        match = steps[steps[:, 2] == config.step]
        if not len(match):
            return None
        row = match[0]
    else:
        row = steps[-2] if len(steps) >= 2 and not view.include_last_step else steps[-1]
    start, end = float(row[0]), float(row[0] + row[1])
    walk = _Walk(trace, k, start, thread_gap_us=config.thread_gap_us, wait_gap_us=config.wait_gap_us)
    links = walk.run(start, end, _main_tid(trace, float(row[0])))
    if not links:
        return None
    span = links[-1].end_us - start
    share: dict[str, float] = defaultdict(float)
    for link in links:
        share[link.kind] += link.end_us - link.start_us
    threads = tuple(sorted({link.tid for link in links if link.kind in ("cpu", "launch", "sync")}))
    return RankPath(trace.rank, int(row[2]), span, tuple(links),
                    {kind: 100.0 * v / span for kind, v in share.items()} if span > 0 else {}, threads)


def critical_path(view: JobView, config: CriticalPathAnalysis.Config | None = None) -> CriticalPath:
    """The critical path of a ProfilerStep on each rank with GPU activity (the last complete one by default).

    Example::

        cp = critical_path(JobView(load_job("traces/")))
        print(cp.rows[0].share_pct, [link.kind for link in cp.rows[0].links])
    """
    config = config or CriticalPathAnalysis.Config(mode=view.mode)
    if config.step >= 0:
        numbers = sorted({int(n) for t in view.traces for n in t.steps[:, 2]})
        if numbers and config.step not in numbers:
            raise ConfigError(
                f"critical-path: no ProfilerStep#{config.step} in the traces; their steps are {numbers[0]}..{numbers[-1]} "
                "(-o critical-path.step=-1 follows the last complete one)"
            )
    rows = [p for t in view.traces if (p := _rank_path(view, t, config)) is not None]
    return CriticalPath(mode=view.mode.value, rows=tuple(rows))


@plugin("analysis", "critical-path")
class CriticalPathAnalysis:
    """Critical path of a step per rank: the chain of CPU work, launches, kernels, collectives and syncs that bounds it."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        step: int = -1
        """The ProfilerStep number to follow (-1: the last complete step)."""

        thread_gap_us: float = 50.0
        """CPU ops of one thread at most this far apart (µs) are one burst of work handed over by the step's thread."""

        wait_gap_us: float = 5.0
        """A GPU event that starts this much later (µs) than both its stream's previous event and its launch waited
        for another stream: the GPU event that ended last before it is then its predecessor."""

        def __post_init__(self) -> None:
            AnalysisConfig.__post_init__(self)
            if self.step < -1:
                raise ValueError(f"step must be a ProfilerStep number or -1 (the last complete step), got {self.step}")
            for name in ("thread_gap_us", "wait_gap_us"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    order = 70
    modes = (Mode.FEDGE, Mode.HTA)

    @staticmethod
    def run(view: JobView, config: Config) -> CriticalPath:
        return critical_path(view, config)
