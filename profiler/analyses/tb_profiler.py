"""torch-tb-profiler 0.4.3's distributed view, from fedge's columns (``fedge profile report --mode tb-profiler``):
per worker and step Computation / Overlapping / Communication / Other, per worker the collectives' data-transfer
vs synchronizing time, and the communication-ops table, with the plugin's own definitions, so the numbers are
those TensorBoard shows for the same traces.

The plugin's definitions (torch_tb_profiler/profiler: event_parser.py, overall_parser.py, communication.py,
loader.py), reproduced step by step:

- a collective is a CPU op or user annotation named ``nccl:``/``gloo:`` + ``broadcast``, ``reduce``,
  ``all_reduce``, ``all_gather`` or ``reduce_scatter`` (``TB_PROFILER_COLLECTIVES``); its ranges are its own CPU
  range plus, with NCCL, the kernels that share its ``External id``. Every other kernel is computation, so the
  SendRecv kernels of an all_to_all compute there;
- steps are the ``ProfilerStep#N`` ranges, each stretched to the end of the GPU work its runtime calls launched;
  trailing steps that launched nothing (or under 80% of the previous step's kernels) are dropped;
- per step: computation = |kernels|, communication = |collective ranges|, overlapping = |both|, other = the rest
  of the step (with no kernels at all, CPU ops stand for computation); "all" is the mean over steps, truncated;
- across workers the j-th range of the i-th collective (in start order) takes the shortest duration across
  workers as its data-transfer time, ending where the range ends; the rest of the range is synchronizing.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.profiler.analyses.base import AnalysisConfig, Column, JobView, Result, Section, as_view
from fedge.profiler.kinds import TB_PROFILER_COLLECTIVES, KernelKind, Mode, is_collective_op
from fedge.profiler.timeline import kernels, merge, tb_profiler_comm_ops
from fedge.profiler.trace import CPU_OP, KERNEL, LEGACY_RUNTIME, Job, Trace
from fedge.registry import plugin

__all__ = ["CommOpRow", "OverviewRow", "TbProfiler", "TbProfilerView", "WaitRow", "tb_profiler_view"]

Range = tuple[float, float]
# The plugin's element sizes for a collective's ``Input type`` (anything else counts 0 bytes there).
_TYPE_BYTES = {"long int": 8, "float": 4, "int": 4, "c10::Half": 2, "c10::BFloat16": 2, "unsigned char": 1}


@dataclass(frozen=True, slots=True)
class OverviewRow:
    """One worker and step (``all``: the mean over steps, truncated to whole µs as the plugin does), in µs:
    computation not overlapped, overlapping, communication not overlapped, other."""

    rank: int
    step: str
    computation_us: float
    overlapping_us: float
    communication_us: float
    other_us: float


@dataclass(frozen=True, slots=True)
class WaitRow:
    """One worker and step: collective time transferring data vs synchronizing (waiting for peers), µs.
    ``step`` is None for the collectives outside every step (the plugin groups them so, and counts that group
    in the mean)."""

    rank: int
    step: str | None
    data_transfer_us: float
    synchronizing_us: float


@dataclass(frozen=True, slots=True)
class CommOpRow:
    """One collective op name on one worker, as the plugin's Communication Operations Stats table shows it."""

    rank: int
    name: str
    calls: int
    total_bytes: int
    avg_bytes: int
    total_latency_us: float
    avg_latency_us: int
    data_transfer_us: float
    avg_data_transfer_us: int


@dataclass(frozen=True, slots=True)
class TbProfilerView(Result):
    """torch-tb-profiler's distributed view: computation/communication overview, synchronizing vs transfer."""

    mode: str
    distributed: bool
    reason: str | None
    overview: tuple[OverviewRow, ...]
    wait: tuple[WaitRow, ...]
    comm_ops: tuple[CommOpRow, ...]
    misleading: tuple[str, ...] = field(default=())

    def to_rows(self) -> list[dict[str, Any]]:
        return [_plain(r) for r in self.overview]

    def sections(self) -> list[Section]:
        ms = [Column("computation_us", "computation ms", "ms"), Column("overlapping_us", "overlapping ms", "ms"),
              Column("communication_us", "communication ms", "ms"), Column("other_us", "other ms", "ms")]
        overview = tuple(_plain(r) for r in self.overview if r.step == "all")
        lines = self.misleading + ((f"no distributed view in torch-tb-profiler: {self.reason}",) if self.reason else ())
        out = [Section("torch-tb-profiler: computation/communication overview (mean per step)",
                       (Column("rank", "worker"), *ms), overview, lines=lines)]
        if self.wait:
            wait = (Column("rank", "worker"), Column("data_transfer_us", "data transfer ms", "ms"),
                    Column("synchronizing_us", "synchronizing ms", "ms"))
            out.append(Section("torch-tb-profiler: synchronizing/communication overview (mean per step)", wait,
                               tuple(_plain(r) for r in self.wait if r.step == "all")))
        if self.comm_ops:
            ops = (Column("rank", "worker"), Column("name", "name"), Column("calls", "calls"),
                   Column("total_bytes", "total bytes"), Column("total_latency_us", "latency ms", "ms"),
                   Column("data_transfer_us", "data transfer ms", "ms"))
            out.append(Section("torch-tb-profiler: communication operations", ops, tuple(_plain(r) for r in self.comm_ops)))
        return out

    def notes(self) -> list[str]:
        return list(self.misleading)


def _plain(row: Any) -> dict[str, Any]:
    # µs as floats, so that the tables show them in ms like every other section
    values = {k: getattr(row, k) for k in row.__slots__}
    return {k: float(v) if k.endswith("_us") else v for k, v in values.items()}


# --- interval helpers, in the plugin's semantics (range_utils.py) ------------------------------------


def _merged(ranges: list[Range]) -> list[Range]:
    """merge_ranges: sorted by start, touching ranges merge."""
    if not ranges:
        return []
    s, e = merge(np.array([r[0] for r in ranges], dtype=np.float64), np.array([r[1] for r in ranges], dtype=np.float64))
    return list(zip(s.tolist(), e.tolist()))


def _intersect(a: list[Range], b: list[Range], b_bounds: tuple[np.ndarray, np.ndarray] | None = None) -> list[Range]:
    """intersection_ranges_lists of two merged lists, in order (empty pieces, which add nothing, left out).

    Not ``timeline.intersection_us``: the per-step costs need the pieces themselves, summed in the plugin's order,
    and |A| + |B| - |A ∪ B| can land an ulp off a value the plugin rounds at .5 µs (ns-precision traces).
    ``b_bounds``: ``b``'s starts and ends as arrays (:func:`_bounds`), for a ``b`` intersected many times."""
    if not a or not b:
        return []
    a_s, a_e = np.array(a).T
    b_s, b_e = b_bounds if b_bounds is not None else _bounds(b)
    lo = np.searchsorted(b_e, a_s, side="right")  # first b ending after a starts
    hi = np.searchsorted(b_s, a_e, side="left")  # b starting before a ends
    out: list[Range] = []
    for i in np.flatnonzero(hi > lo):
        for j in range(lo[i], hi[i]):
            s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if e > s:
                out.append((s, e))
    return out


def _bounds(ranges: list[Range]) -> tuple[np.ndarray, np.ndarray]:
    starts, ends = np.array(ranges).T
    return starts, ends


def _sum(ranges: list[Range]) -> float:
    total: float = 0  # get_ranges_sum: left to right, from int 0
    for s, e in ranges:
        total += e - s
    return total


# --- one worker ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _CommNode:
    name: str
    start: float
    end: float
    nbytes: int
    kernel_ranges: list[Range]
    real_ranges: list[Range] = field(default_factory=list)
    step: str | None = None


@dataclass(slots=True)
class _Worker:
    rank: int
    steps: list[Range]
    step_names: list[str]
    costs: list[tuple[float, float, float, float]]  # per step: computation, communication, overlap, other
    nodes: list[_CommNode]
    has_communication: bool


def _bytes(args: dict[str, Any]) -> int:
    shapes = args.get("Input Dims") or []
    types = args.get("Input type") or []
    total = 0
    for i, shape in enumerate(shapes):
        one = _TYPE_BYTES.get(types[i], 0) if i < len(types) else 0
        size = 1
        for n in shape if isinstance(shape, list) else ():
            size *= n
        total += size * one
    return total


def _attach(trace: Trace, rt: np.ndarray) -> dict[int, list[int]]:
    """Per runtime call (index into ``rt``, in start order), the device events of its correlation id: each
    belongs to the latest such call before it, else to the next one."""
    cpu, gpu = trace.cpu, trace.gpu
    by_corr: dict[int, int] = {}
    pending: dict[int, list[int]] = {}
    attached: dict[int, list[int]] = {}
    order = np.argsort(np.concatenate([cpu.ts_at(rt), gpu.ts]), kind="stable")
    n_rt = len(rt)
    rt_corr, gpu_corr = cpu.corr[rt].tolist(), gpu.corr.tolist()
    for i in order.tolist():
        if i < n_rt:
            corr = rt_corr[i]
            attached[i] = pending.pop(corr, [])
            by_corr[corr] = i
        else:
            d, corr = i - n_rt, gpu_corr[i - n_rt]
            if corr in by_corr:
                attached[by_corr[corr]].append(d)
            else:
                pending.setdefault(corr, []).append(d)
    return attached


def _device_steps(trace: Trace, steps: list[Range]) -> tuple[float | None, list[Range], list[int]]:
    """StepParser._find_device_steps: the GPU span each host step launched, from its runtime calls."""
    cpu, gpu = trace.cpu, trace.gpu
    rt = np.flatnonzero(cpu.cat == LEGACY_RUNTIME)  # the plugin reads ``Runtime``, not ``cuda_runtime``
    rt = rt[np.argsort(cpu.ts_at(rt), kind="stable")]
    attached = _attach(trace, rt)
    n_rt = len(rt)
    rt_start, rt_end = cpu.ts_at(rt).tolist(), cpu.end_at(rt).tolist()
    dev_start, dev_end = gpu.ts.tolist(), gpu.end_at().tolist()
    big, small = sys.maxsize, -sys.maxsize - 1
    steps_device: list[Range] = [(big, small)] * len(steps)
    matched_count = [0] * len(steps)
    matched: set[int] = set()
    i_step = i_rt = 0
    lo, hi = big, small
    while i_step < len(steps) and i_rt < n_rt:
        start, end = steps[i_step]
        if rt_start[i_rt] < start:
            i_rt += 1
        elif rt_end[i_rt] <= end:
            for d in attached.get(i_rt, []):
                lo, hi = min(dev_start[d], lo), max(dev_end[d], hi)
                matched.add(d)
                matched_count[i_step] += 1
            i_rt += 1
        elif rt_start[i_rt] < end:
            i_rt += 1
        else:
            steps_device[i_step] = (lo, hi)
            i_step += 1
            lo, hi = big, small
    while i_step < len(steps):
        steps_device[i_step] = (lo, hi)
        lo, hi = big, small
        i_step += 1
    prev_end: float | None = None
    if matched:
        prev_end = steps[0][0]
        if steps_device[0][0] != big:
            unmatched = np.ones(len(gpu), dtype=bool)
            unmatched[list(matched)] = False
            ends = gpu.end_at(unmatched)
            before = ends[ends < steps_device[0][0]]
            if len(before):
                prev_end = max(prev_end, float(before.max()))
    return prev_end, steps_device, matched_count


def _stretch_steps(steps: list[Range], names: list[str], device: tuple[float | None, list[Range], list[int]]) -> tuple[list[Range], list[str]]:
    """StepParser._update_steps_duration: steps moved to the GPU side; trailing steps without GPU work dropped."""
    prev_end, steps_device, matched = device
    if prev_end is None:
        return steps, names
    out = []
    for (start, end), (_, dev_end) in zip(steps, steps_device):
        start = max(prev_end, start)
        end = max(end, start) if dev_end == -sys.maxsize - 1 else max(max(end, dev_end), start)
        out.append((start, end))
        prev_end = end
    if len(out) > 1:
        i = len(out) - 1
        while i >= 0 and matched[i] == 0:
            i -= 1
        if i >= 0:
            keep = i if i > 0 and matched[i - 1] * 0.8 > matched[i] else i + 1
            out, names = out[:keep], names[:keep]
    return out, names


def _worker(trace: Trace) -> _Worker:
    cpu, gpu, names = trace.cpu, trace.gpu, trace.names
    comm_rows = tb_profiler_comm_ops(trace)
    libs = {names[cpu.name[r]].split(":")[0] for r in comm_rows.tolist()}
    by_ext: dict[int, _CommNode] = {}
    comm_ranges: list[Range] = []
    for r, start, end in zip(comm_rows.tolist(), cpu.ts_at(comm_rows).tolist(), cpu.end_at(comm_rows).tolist()):
        by_ext[int(cpu.ext[r])] = _CommNode(names[cpu.name[r]], start, end, _bytes(trace.comm_args.get(("cpu", r), {})),
                                            [(start, end)])
        comm_ranges.append((start, end))
    k = np.flatnonzero(gpu.cat == KERNEL)
    k = k[np.argsort(gpu.ts_at(k), kind="stable")]
    is_comm = np.isin(gpu.ext[k], np.array(list(by_ext), dtype=np.int64))
    k_start, k_end = gpu.ts_at(k).tolist(), gpu.end_at(k).tolist()
    kernel_ranges = [(s, e) for s, e, c in zip(k_start, k_end, is_comm.tolist()) if not c]
    for s, e, c, ext in zip(k_start, k_end, is_comm.tolist(), gpu.ext[k].tolist()):
        if c:
            comm_ranges.append((s, e))
            if "nccl" in libs:
                by_ext[ext].kernel_ranges.append((s, e))
    op = np.flatnonzero(cpu.cat == CPU_OP)
    plain = np.array([not (n.startswith(("ProfilerStep#", "enumerate(DataPipe)#")) or n in TB_PROFILER_COLLECTIVES
                           or (n.startswith("enumerate(DataLoader)#") and n.endswith(".__next__"))) for n in names]
                     or [False], dtype=bool)
    is_cpu_op = plain[cpu.name[op]]
    cpu_op_ranges = list(zip(cpu.ts_at(op[is_cpu_op]).tolist(), cpu.end_at(op[is_cpu_op]).tolist()))
    table = np.concatenate([trace.steps, trace.gpu_steps])
    table = table[np.argsort(table[:, 0], kind="stable")]
    steps = [(s, s + d) for s, d in zip(table[:, 0].tolist(), table[:, 1].tolist())]
    labels = [str(int(n)) for n in table[:, 2].tolist()]
    if not steps and len(op):  # no ProfilerStep: the plugin takes the CPU ops' span as step "0"
        steps, labels = [(float(cpu.ts_at(op).min()), float(cpu.end_at(op).max()))], ["0"]
    steps, labels = _stretch_steps(steps, labels, _device_steps(trace, steps))
    comm_role, kernel_role = _merged(comm_ranges), _merged(kernel_ranges)
    computation = kernel_role or _merged(cpu_op_ranges)
    overlap = _intersect(computation, comm_role)
    costs = []
    # Each step cuts its part out of the same three lists: their bounds are made once, not once per step.
    bounds = [(r, _bounds(r) if r else None) for r in (overlap, computation, comm_role)]
    for step in steps:
        o, c, m = (_sum(_intersect([step], r, b)) for r, b in bounds)
        costs.append((c, m, o, step[1] - step[0] + o - c - m))
    nodes = [] if len(libs) > 1 else _assign_steps(list(by_ext.values()), steps, labels)
    return _Worker(trace.rank, steps, labels, costs, nodes, bool(comm_role))


def _assign_steps(nodes: list[_CommNode], steps: list[Range], names: list[str]) -> list[_CommNode]:
    """generate_communication_nodes: nodes in start order, each named after the step that contains it."""
    for n in nodes:
        n.kernel_ranges.sort(key=lambda x: (x[0], -x[1]))
    nodes.sort(key=lambda x: (x.start, -x.end))
    index = 0
    for n in nodes:
        while index < len(steps):
            if n.start >= steps[index][0] and n.end <= steps[index][1]:
                n.step = names[index]
                break
            if n.start >= steps[index][1]:
                index += 1
            else:
                break
        if index >= len(steps):
            break
    return nodes


# --- across workers ------------------------------------------------------------------------------------


def _match_workers(workers: list[_Worker]) -> str | None:
    """RunLoader._process_distributed_profiles: data-transfer ranges from the shortest duration across workers.
    Returns why there is no distributed view, or None."""
    for w in workers:
        if not (w.has_communication and w.nodes):
            return f"rank {w.rank} has no collective op torch-tb-profiler knows"
    counts = {len(w.nodes) for w in workers}
    if len(counts) > 1:
        return f"the workers ran different numbers of known collective ops ({', '.join(str(len(w.nodes)) for w in workers)})"
    first = workers[0].nodes
    for i, node in enumerate(first):
        size = len(node.kernel_ranges)
        if any(len(w.nodes[i].kernel_ranges) != size for w in workers):
            return f"collective {i} ({node.name}) has different numbers of kernels on the workers"
        for j in range(size):
            shortest = min(w.nodes[i].kernel_ranges[j][1] - w.nodes[i].kernel_ranges[j][0] for w in workers)
            for w in workers:
                end = w.nodes[i].kernel_ranges[j][1]
                w.nodes[i].real_ranges.append((end - shortest, end))
    return None


def _rows(w: _Worker) -> tuple[list[OverviewRow], list[WaitRow], list[CommOpRow]]:
    """DistributedRunGenerator's overlap graph, wait graph and ops table for one worker."""
    per_step: dict[str, list[float]] = {}
    total: list[float] = [0, 0, 0, 0]
    for name, (c, m, o, other) in zip(w.step_names, w.costs):
        per_step[name] = [c - o, o, m - o, other]
        total = [a + b for a, b in zip(total, per_step[name])]
    n = max(1, len(w.step_names))
    overview = [OverviewRow(w.rank, "all", *(int(x / n) for x in total))]
    overview += [OverviewRow(w.rank, s, *v) for s, v in per_step.items()]
    ranges: dict[str | None, tuple[list[Range], list[Range]]] = {}
    ops: dict[str, list[Any]] = {}
    for node in w.nodes:
        kernel, real = ranges.setdefault(node.step, ([], []))
        kernel.extend(node.kernel_ranges)
        real.extend(node.real_ranges)
        stat = ops.setdefault(node.name, [0, 0, [], []])
        stat[0] += 1
        stat[1] += node.nbytes
        stat[2].extend(node.kernel_ranges)
        stat[3].extend(node.real_ranges)
    wait_total: list[float] = [0, 0]
    waits = []
    for step, (kernel, real) in ranges.items():
        transfer, latency = _sum(_merged(real)), _sum(_merged(kernel))
        waits.append(WaitRow(w.rank, step, transfer, latency - transfer))
        wait_total = [wait_total[0] + transfer, wait_total[1] + (latency - transfer)]
    wait = [WaitRow(w.rank, "all", *(int(x / max(1, len(ranges))) for x in wait_total)), *waits]
    table = []
    for name, (calls, nbytes, kernel, real) in ops.items():
        latency, transfer = _sum(_merged(kernel)), _sum(_merged(real))
        table.append(CommOpRow(w.rank, name, calls, nbytes, round(nbytes / calls), latency, round(latency / calls),
                               transfer, round(transfer / calls)))
    return overview, wait, table


def _misleading(view: JobView) -> tuple[str, ...]:
    """Where the plugin's definitions hide communication: collective ops it does not know, and the kernels
    fedge classifies as communication that it counts as computation."""
    unknown: Counter[str] = Counter()
    hidden_us = 0.0
    ranks = []
    for t in view.traces:
        names = [t.names[i] for i in t.cpu.name.tolist()]
        found = Counter(n for n in names if is_collective_op(n) and n.split(":")[0] in ("nccl", "gloo")
                        and n not in TB_PROFILER_COLLECTIVES)
        fedge_kind = kernels(t, Mode.FEDGE, include_last_step=True)
        tb_kind = view.kernels(t).kind
        by_row = np.full(len(t.gpu), -1, dtype=np.int8)
        by_row[view.kernels(t).row] = tb_kind
        hidden = (fedge_kind.kind == int(KernelKind.COMMUNICATION)) & (by_row[fedge_kind.row] == int(KernelKind.COMPUTATION))
        us = float(np.sum(fedge_kind.end[hidden] - fedge_kind.ts[hidden]))
        if found or us:
            ranks.append(t.rank)
        unknown += found
        hidden_us += us
    if not ranks:
        return ()
    ops = ", ".join(f"{n} x{c}" for n, c in sorted(unknown.items()))
    return (
        "torch-tb-profiler knows only the nccl/gloo broadcast, reduce, all_reduce, all_gather and reduce_scatter ops: "
        f"on rank(s) {', '.join(map(str, ranks))} " + (f"{ops} and " if ops else "")
        + f"{hidden_us / 1000:,.2f} ms of communication kernels count as Computation here, so its Communication and "
        "Overlapping understate the traffic; fedge profile report (default --mode fedge) counts them as communication",
    )


def tb_profiler_view(data: Job | Trace | JobView) -> TbProfilerView:
    """torch-tb-profiler 0.4.3's distributed view of a job.

    Example::

        view = tb_profiler_view(load_job("traces/"))
        print([(r.rank, r.computation_us, r.communication_us) for r in view.overview if r.step == "all"])
    """
    view = as_view(data, mode=Mode.TB_PROFILER, include_last_step=True)
    workers = [_worker(t) for t in view.traces]
    reason = _match_workers(workers) if workers else "no trace"
    overview: list[OverviewRow] = []
    wait: list[WaitRow] = []
    ops: list[CommOpRow] = []
    for w in workers:
        o, wt, table = _rows(w)
        overview += o
        if reason is None:
            wait += wt
            ops += table
    return TbProfilerView(mode=Mode.TB_PROFILER.value, distributed=reason is None, reason=reason,
                          overview=tuple(overview), wait=tuple(wait), comm_ops=tuple(ops), misleading=_misleading(view))


@plugin("analysis", "tb-profiler")
class TbProfiler:
    """torch-tb-profiler's distributed view (--mode tb-profiler): per worker Computation / Overlapping /
    Communication / Other, data transfer vs synchronizing, communication ops."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        pass

    order = 15
    modes = (Mode.TB_PROFILER,)

    @staticmethod
    def run(view: JobView, config: Config) -> TbProfilerView:
        return tb_profiler_view(view)
