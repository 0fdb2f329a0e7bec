"""Recommendations: plain sentences tied to what the other analyses measured, naming the fedge strategy
to try where one applies."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedge.profiler.analyses.base import AnalysisConfig, JobView, Result, Section
from fedge.profiler.analyses.collectives import CollectiveStats, collectives
from fedge.profiler.analyses.idle import IdleBreakdown, idle_time
from fedge.profiler.analyses.overlap import CommCompOverlap, comm_comp_overlap
from fedge.profiler.analyses.stragglers import StragglerReport, stragglers
from fedge.profiler.analyses.temporal import TemporalBreakdown, temporal_breakdown
from fedge.registry import plugin

__all__ = ["Recommend", "Recommendation", "Recommendations", "recommend"]


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One finding: ``id`` is stable for scripts, ``evidence`` holds the numbers it rests on."""

    id: str
    message: str
    ranks: tuple[int, ...]
    strategies: tuple[str, ...] = ()
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Recommendations(Result):
    """What to change, most important first."""

    rows: tuple[Recommendation, ...]

    def report_fields(self) -> dict[str, object]:
        return {"recommendations": self.to_rows()}

    def sections(self) -> list[Section]:
        return [Section("Recommendations", lines=tuple(r.message for r in self.rows))]


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def recommend(
    temporal: TemporalBreakdown,
    overlap: CommCompOverlap,
    idle: IdleBreakdown,
    colls: CollectiveStats,
    late: StragglerReport,
    *,
    exposed_comm_pct: float = 10.0,
    idle_pct: float = 30.0,
) -> Recommendations:
    """Turn measurements into recommendations (pure: reads the results, computes nothing new).

    Example::

        recs = recommend(temporal_breakdown(job), comm_comp_overlap(job), idle_time(job), collectives(job), stragglers(job))
        for r in recs.rows: print(r.message)
    """
    span = {r.rank: r.span_us for r in temporal.rows}
    out = _no_gpu(temporal, span) + _communication(overlap, colls, span, exposed_comm_pct)
    exposed = any(r.id == "exposed-communication" for r in out)
    out += _idle(idle, span, idle_pct) + _waiting(late, colls)
    busy = [r for r in temporal.rows if r.device == "gpu" and r.compute_pct >= 80.0]
    if busy and not exposed:
        out.append(Recommendation(
            "compute-bound",
            f"Ranks {', '.join(str(r.rank) for r in busy)} spend {min(r.compute_pct for r in busy):.0f}%+ of the span "
            "computing: communication is not the bottleneck. Speed up kernels (mixed precision, fused ops) or, if the "
            "model no longer fits, split it with the megatron (tensor parallel) or pipeline strategy.",
            tuple(r.rank for r in busy), ("megatron", "pipeline")))
    if not out and temporal.rows:
        out.append(Recommendation("balanced", "No dominant bottleneck found: communication is mostly hidden and the GPU is busy.",
                                  tuple(span)))
    return Recommendations(rows=tuple(out))


def _no_gpu(temporal: TemporalBreakdown, span: dict[int, float]) -> list[Recommendation]:
    out: list[Recommendation] = []
    devices = {r.rank: r.device for r in temporal.rows}
    if temporal.rows and all(d == "cpu" for d in devices.values()):
        out.append(Recommendation(
            "no-gpu", "No GPU activity in these traces: the breakdown below is measured on CPU ops (collectives "
            "such as gloo:all_reduce vs the rest). On GPUs, train with NCCL to overlap communication with compute.",
            tuple(span), ("allreduce",)))
    return out


def _communication(overlap: CommCompOverlap, colls: CollectiveStats, span: dict[int, float],
                   exposed_comm_pct: float) -> list[Recommendation]:
    out: list[Recommendation] = []
    exposed = [o for o in overlap.rows if _pct(o.exposed_comm_us, span.get(o.rank, 0.0)) >= exposed_comm_pct]
    if exposed:
        worst = max(exposed, key=lambda o: _pct(o.exposed_comm_us, span[o.rank]))
        share = _pct(worst.exposed_comm_us, span[worst.rank])
        out.append(Recommendation(
            "exposed-communication",
            f"Communication not hidden under computation takes {share:.0f}% of rank {worst.rank}'s GPU time "
            f"({worst.overlap_pct or 0:.0f}% of its communication overlaps compute). Overlap gradient all-reduce with "
            "the backward pass (DDP buckets: tune bucket_cap_mb), compress or accumulate gradients, or try fedge's "
            "ring-allreduce / tree-allreduce strategies, or parameter-server when a few ranks are slow.",
            tuple(o.rank for o in exposed), ("ring-allreduce", "tree-allreduce", "parameter-server"),
            {"exposed_comm_pct": round(share, 2), "overlap_pct": round(worst.overlap_pct or 0.0, 2)}))
    small = [c for c in colls.rows if c.collective == "all_reduce" and c.mean_bytes is not None and c.mean_bytes < (1 << 20) and c.count >= 20]
    if small:
        c = small[0]
        out.append(Recommendation(
            "small-allreduce",
            f"{c.count} all-reduces of {c.mean_bytes or 0:.0f} bytes on average (rank {c.rank}): latency-bound. Bucket "
            "them into fewer, larger messages; tree-allreduce has lower latency than ring for small messages.",
            tuple(sorted({x.rank for x in small})), ("tree-allreduce",), {"mean_bytes": float(c.mean_bytes or 0)}))
    return out


def _idle(idle: IdleBreakdown, span: dict[int, float], idle_pct: float) -> list[Recommendation]:
    out: list[Recommendation] = []
    host = [r for r in idle.rows if _pct(r.idle_us, span.get(r.rank, 0.0)) >= idle_pct and r.host_wait_us >= 0.5 * r.idle_us]
    if host:
        r = max(host, key=lambda x: x.host_wait_us)
        out.append(Recommendation(
            "host-bound",
            f"Rank {r.rank}'s GPU is idle {_pct(r.idle_us, span[r.rank]):.0f}% of the time, mostly waiting for the host "
            f"to launch work ({_pct(r.host_wait_us, r.idle_us):.0f}% of the idle time). Use larger batches, CUDA graphs "
            "or torch.compile to cut launch overhead, and more DataLoader workers / pinned memory for input.",
            tuple(x.rank for x in host), (), {"idle_pct": round(_pct(r.idle_us, span[r.rank]), 2)}))
    other_idle = [r for r in idle.rows if _pct(r.idle_us, span.get(r.rank, 0.0)) >= idle_pct and r not in host]
    if other_idle:
        r = max(other_idle, key=lambda x: x.idle_us)
        out.append(Recommendation(
            "gpu-idle",
            f"Rank {r.rank}'s GPU is idle {_pct(r.idle_us, span[r.rank]):.0f}% of the time with work already queued "
            "(synchronisation, CPU-side waits, data loading). Look for .item()/.cpu() syncs and blocking collectives; "
            "a pipeline strategy can fill bubbles when stages wait on each other.",
            (r.rank,), ("pipeline",), {"idle_pct": round(_pct(r.idle_us, span[r.rank]), 2)}))
    return out


def _waiting(late: StragglerReport, colls: CollectiveStats) -> list[Recommendation]:
    out: list[Recommendation] = []
    slow = [r for r in late.rows if r.straggler]
    if slow:
        r = slow[0]
        out.append(Recommendation(
            "straggler",
            f"Rank {r.rank} arrives last to {r.times_last} of {r.matched} collectives, {r.mean_delay_us:.0f} us late on "
            "average: the others wait for it. Check its input pipeline and load balance; an asynchronous "
            "parameter-server tolerates slow workers.",
            tuple(x.rank for x in slow), ("parameter-server",), {"mean_delay_us": round(r.mean_delay_us, 2)}))
    waits = [w for w in colls.wait if w.wait_us + w.transfer_us > 0 and w.wait_us > w.transfer_us]
    if waits and not slow:
        w = max(waits, key=lambda x: x.wait_us)
        out.append(Recommendation(
            "collective-wait",
            f"Rank {w.rank} spends {_pct(w.wait_us, w.wait_us + w.transfer_us):.0f}% of its collective time waiting for "
            "peers rather than transferring: the imbalance is before the collective (uneven work or input), not the network.",
            tuple(x.rank for x in waits), (), {"wait_us": round(w.wait_us, 2)}))
    return out


@plugin("analysis", "recommendations")
class Recommend:
    """Recommendations tied to the measurements, naming fedge strategies where one applies."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        exposed_comm_pct: float = 10.0
        """Exposed communication, as % of a rank's span, above which overlap is recommended."""

        idle_pct: float = 30.0
        """GPU idle %, of a rank's span, above which idle time is reported."""

    order = 90

    @staticmethod
    def run(view: JobView, config: Config) -> Recommendations:
        kw = {"mode": config.mode, "include_last_step": config.include_last_step}
        return recommend(temporal_breakdown(view, **kw), comm_comp_overlap(view, **kw), idle_time(view, **kw),
                         collectives(view, **kw), stragglers(view, **kw),
                         exposed_comm_pct=config.exposed_comm_pct, idle_pct=config.idle_pct)
