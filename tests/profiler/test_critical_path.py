"""Critical path of a step: on a synthetic trace with a known chain (CPU, a launch, a kernel, a sync that waits
for it, the backward work handed to autograd's thread, a kernel launched there, an NCCL kernel that waits for it
on another stream) it finds exactly that chain; on the shared traces it agrees with Holistic Trace Analysis 0.5's
critical path (stored by scripts/hta-critical-path) where HTA's graph has the same dependencies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.cli.app import main
from fedge.profiler import JobView, load_job
from fedge.profiler.analyses.critical_path import CriticalPathAnalysis, critical_path

HTA = json.loads((Path(__file__).parent / "data" / "hta-critical-path.json").read_text())
NCCL = "ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)"


def _chain_trace(tmp_path, builder):
    # step 1 (0-1000 us) holds the chain; a kernel on another stream is off it; step 2 is the profiler's last
    b = builder(rank=0).step(1, 0, 1000).step(2, 1000, 1000)
    b.cpu_op("aten::mm", 10, 10)
    b.kernel("gemm_a", 30, 500, launch_ts=20, launch_dur=5)
    b.kernel("side_kernel", 40, 100, launch_ts=26, launch_dur=2, stream=9)
    b.cpu_op("cudaDeviceSynchronize", 30, 510, cat="cuda_runtime")
    # loss.backward(): the main thread hands the work to autograd's thread 2, which launches gemm_b and the
    # all-reduce; the all-reduce waits (cudaStreamWaitEvent) for gemm_b on its own stream
    b.cpu_op("autograd::engine::evaluate_function: MmBackward0", 600, 100, tid=2)
    b.kernel("gemm_b", 660, 100, launch_ts=650, launch_dur=5, tid=2)
    b.kernel(NCCL, 765, 135, launch_ts=665, launch_dur=5, tid=2, stream=20)
    return b.write(tmp_path / "rank0_trace.json")


def test_the_known_chain_is_found_across_threads_and_streams(tmp_path, builder):
    # Prepare
    path = _chain_trace(tmp_path, builder)
    # Execute
    (row,) = critical_path(JobView(load_job(path))).rows
    # Assert
    got = [(link.kind, link.name, link.start_us, link.end_us, link.tid) for link in row.links]
    assert got == [
        ("cpu", "", 0.0, 20.0, 1), ("launch", "cudaLaunchKernel", 20.0, 25.0, 1), ("launch_delay", "", 25.0, 30.0, 7),
        ("kernel", "gemm_a", 30.0, 530.0, 7), ("sync", "cudaDeviceSynchronize", 530.0, 540.0, 1),
        ("cpu", "", 540.0, 600.0, 1), ("cpu", "", 600.0, 650.0, 2), ("launch", "cudaLaunchKernel", 650.0, 655.0, 2),
        ("launch_delay", "", 655.0, 660.0, 7), ("kernel", "gemm_b", 660.0, 760.0, 7), ("kernel_gap", "", 760.0, 765.0, 20),
        ("collective", NCCL, 765.0, 900.0, 20),
    ]
    assert row.step == 1 and row.span_us == 900.0 and row.threads == (1, 2)
    assert row.share_pct["kernel"] == pytest.approx(100 * 600 / 900)
    assert row.share_pct["collective"] == pytest.approx(100 * 135 / 900)
    assert sum(row.share_pct.values()) == pytest.approx(100.0)


def test_critical_path_is_in_the_report_and_its_settings_are_checked(tmp_path, builder, capsys):
    path = _chain_trace(tmp_path, builder)
    assert main(["profile", "report", str(path), "--json", "-o", "critical-path.step=1"]) == 0
    body = json.loads(capsys.readouterr().out)["analyses"]["critical-path"]
    assert body["rows"][0]["kernel_pct"] == pytest.approx(66.67) and len(body["paths"][0]["links"]) == 12
    assert main(["profile", "report", str(path), "-o", "critical-path.thread_gap_us=-1"]) == 1
    assert "thread_gap_us must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError):
        CriticalPathAnalysis.Config(wait_gap_us=-1)
    # A step no trace has is said in the report's notes (the other analyses still report), not an empty table.
    assert main(["profile", "report", str(path), "--json", "-o", "critical-path.step=7"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "critical-path" not in report["analyses"]
    assert any("no ProfilerStep#7 in the traces; their steps are" in n for n in report["notes"]), report["notes"]


def _in_window(shared_job, name: str) -> tuple[dict[str, float], dict]:
    """fedge's path of the step HTA follows (the first), cut to where HTA's path starts and ends, µs by kind."""
    ref = HTA[name]
    job = shared_job(name)
    trace = next(t for t in job.traces if t.rank == ref["rank"])
    rows = critical_path(JobView(job, mode="hta"), CriticalPathAnalysis.Config(mode="hta", step=int(trace.steps[0, 2]))).rows
    row = next(r for r in rows if r.rank == ref["rank"])
    t0 = min(float(trace.cpu.ts.min()), float(trace.gpu.ts.min()))  # HTA's times start at the trace's first event
    lo, hi = t0 + ref["start_ts"], t0 + ref["end_ts"]
    assert row.links[-1].end_us == pytest.approx(hi)  # both end at the step's last GPU event
    by: dict[str, float] = {}
    for link in row.links:
        s, e = max(link.start_us, lo), min(link.end_us, hi)
        if e > s:
            by[link.kind] = by.get(link.kind, 0.0) + e - s
    return by, ref["duration_by_bound"]


@pytest.mark.slow
def test_a_gpu_bound_step_agrees_with_hta(shared_job):
    # v100 DDP step: HTA's graph and fedge's walk follow the same kernels, gaps and launches
    by, hta = _in_window(shared_job, "hta-v100-1gpu-ws1")
    assert by.get("kernel", 0) + by.get("memory", 0) == pytest.approx(hta["gpu_compute_bound"], rel=1e-3)
    assert by["kernel_gap"] == pytest.approx(hta["gpu_kernel_kernel_overhead"], rel=1e-2)
    assert by.get("launch", 0) + by.get("launch_delay", 0) == pytest.approx(hta["gpu_kernel_launch_overhead"], abs=2)
    # HTA weighs the CPU only inside ops (the gaps between a thread's top-level ops are zero-weight edges)
    assert hta["cpu_bound"] <= by["cpu"] + by.get("sync", 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hta-a100-2gpu-rank0-nccl-args", "hta-sampled-128gpu-2rank", "hta-amd-mi250-minitoy"])
def test_cpu_bound_steps_agree_with_hta(shared_job, name):
    by, hta = _in_window(shared_job, name)
    assert hta["cpu_bound"] / sum(hta.values()) > 0.99
    assert (by["cpu"] + by.get("launch", 0) + by.get("sync", 0)) / sum(by.values()) > 0.99


@pytest.mark.slow
def test_where_hta_has_no_sync_edges_fedge_follows_the_wait_to_the_collective(shared_job):
    # a100 16-GPU step: without CUDA sync events HTA has no edge from the all-reduce a kernel waited for, so it
    # calls 87% of the path kernel-to-kernel overhead; fedge follows the cross-stream wait to the NCCL kernels and
    # the CPU that launched them late
    by, hta = _in_window(shared_job, "hta-a100-16gpu-rank0")
    assert hta["gpu_kernel_kernel_overhead"] / sum(hta.values()) > 0.8 and "gpu_communication_bound" not in hta
    assert by["collective"] > 0.1 * sum(by.values()) and by["kernel_gap"] < hta["gpu_kernel_kernel_overhead"]


@pytest.mark.slow
def test_the_legacy_trace_hta_cannot_follow_gets_a_path_through_the_autograd_thread(shared_job):
    assert not HTA["kineto-legacy-resnet50-1gpu"]["ok"]  # HTA asserts on a memcpy whose launch it cannot find
    (row,) = critical_path(JobView(shared_job("kineto-legacy-resnet50-1gpu"))).rows
    assert len(row.threads) == 2 and sum(row.share_pct.values()) == pytest.approx(100.0)
    assert all(a.end_us <= b.start_us + 1e-6 for a, b in zip(row.links, row.links[1:]))
