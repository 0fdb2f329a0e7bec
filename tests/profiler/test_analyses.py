"""Each analysis on tiny synthetic traces with known answers."""

from __future__ import annotations

import pytest

from fedge.profiler import (
    KernelKind,
    collectives,
    comm_comp_overlap,
    idle_time,
    kernel_breakdown,
    load_job,
    load_trace,
    stragglers,
    temporal_breakdown,
)
from fedge.profiler.analyses.recommendations import Recommend
from fedge.profiler.kinds import Mode, classify_kernel, collective_of_kernel, collective_of_op

NCCL = "ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*, unsigned long, ncclWork*)"


def _overlap_trace(tmp_path, builder):
    # compute [0,100) and [150,200) on stream 7; comm [50,170) on stream 20; memcpy [300,310); span 310
    b = builder().kernel("gemm", 0, 100).kernel("relu", 150, 50).kernel(NCCL, 50, 120, stream=20)
    b.kernel("Memcpy DtoH (Device -> Pageable)", 300, 10, cat="gpu_memcpy")
    return load_trace(b.write(tmp_path / "t.json"))


def test_temporal_breakdown_uses_unions(tmp_path, builder):
    row = temporal_breakdown(_overlap_trace(tmp_path, builder)).rows[0]
    assert row.span_us == 310 and row.compute_us == 150
    assert row.idle_us == 310 - 210  # busy = [0,200) + [300,310)
    assert row.non_compute_us == 310 - 150 - 100 and row.memory_us == 10


def test_overlap_is_comm_hidden_under_compute(tmp_path, builder):
    row = comm_comp_overlap(_overlap_trace(tmp_path, builder)).rows[0]
    assert row.comm_us == 120 and row.overlapped_comm_us == 50 + 20
    assert row.exposed_comm_us == 50 and row.overlap_pct == pytest.approx(100 * 70 / 120)


def test_kernel_types_exclusive_and_top(tmp_path, builder):
    kb = kernel_breakdown(_overlap_trace(tmp_path, builder), top=2).ranks[0]
    assert kb.exclusive_us == {"COMPUTATION": 80, "COMPUTATION overlapping COMMUNICATION": 70, "COMMUNICATION": 50, "MEMORY": 10}
    assert kb.sum_us == {"COMPUTATION": 150, "COMMUNICATION": 120, "MEMORY": 10}
    assert [k.name for k in kb.top] == [NCCL, "gemm"] and kb.top[0].count == 1


def test_overlapping_kernels_on_one_stream_are_merged(tmp_path, builder):
    b = builder().kernel("a", 0, 10).kernel("b", 9.5, 10)  # programmatic dependent launch overlap
    row = temporal_breakdown(load_trace(b.write(tmp_path / "t.json"))).rows[0]
    assert row.compute_us == pytest.approx(19.5) and row.idle_us == 0


def test_last_step_dropped_when_two_or_more(tmp_path, builder):
    b = builder().step(1, 0, 1000).step(2, 1000, 1000)
    b.kernel("early", 100, 50, launch_ts=90).kernel("late_launch", 1200, 50, launch_ts=1100)
    trace = load_trace(b.write(tmp_path / "t.json"))
    assert temporal_breakdown(trace).rows[0].compute_us == 50
    assert temporal_breakdown(trace, include_last_step=True).rows[0].compute_us == 100
    one = builder().step(1, 0, 1000).kernel("early", 100, 50).kernel("late", 1200, 50, launch_ts=1100)
    assert temporal_breakdown(load_trace(one.write(tmp_path / "one.json"))).rows[0].compute_us == 100


def test_duplicated_gpu_step_is_not_a_second_step_in_fedge_mode(tmp_path, builder):
    b = builder().step(1, 0, 1000, gpu_copy=True).kernel("k", 100, 50).kernel("k", 1200, 50, launch_ts=1100)
    trace = load_trace(b.write(tmp_path / "t.json"))
    assert len(trace.steps) == 1 and len(trace.gpu_steps) == 1
    assert temporal_breakdown(trace).rows[0].compute_us == 100


def test_ns_timestamps_hta_rounds_fedge_keeps(tmp_path, builder):
    b = builder().kernel("a", 10.2, 0.5).kernel("b", 11.3, 2.0)
    trace = load_trace(b.write(tmp_path / "t.json"))
    assert temporal_breakdown(trace).rows[0].compute_us == pytest.approx(2.5)
    # HTA: start rounded up, end down: a becomes [11, 10] (length -1), b [12, 13]; the negative interval
    # cancels b, so HTA reports no compute at all where 2.5 us ran (docs/profiler.md, "Where HTA is wrong")
    assert temporal_breakdown(trace, mode="hta").rows[0].compute_us == pytest.approx(0.0)


def test_classification_recognises_non_nccl_collectives():
    for name in ("multimem_all_reduce_kernel<float>", "ncclDevKernel_Generic(ncclDevKernelArgsStorage<4096ul>)",
                 "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "dpsk::ep::internode::dispatch<8>",
                 "void vllm::cross_device_reduce_1stage<float, 8>"):
        assert classify_kernel(name, is_memory_event=False, mode=Mode.FEDGE) is KernelKind.COMMUNICATION, name
    # HTA counts symmetric-memory all-reduce as computation: that is HTA being wrong (docs/profiler.md)
    assert classify_kernel("multimem_all_reduce_kernel<float>", is_memory_event=False, mode=Mode.HTA) is KernelKind.COMPUTATION
    assert classify_kernel("void at::native::reduce_kernel<512>", is_memory_event=False, mode=Mode.FEDGE) is KernelKind.COMPUTATION
    assert classify_kernel("Memset (Device)", is_memory_event=True, mode=Mode.FEDGE) is KernelKind.MEMORY
    assert collective_of_kernel("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclDevComm*)") == "send_recv"
    assert collective_of_kernel("ncclDevKernel_Generic(x)") == "unknown"
    assert collective_of_op("c10d::alltoall_base_") == "all_to_all" and collective_of_op("gloo:all_reduce") == "all_reduce"
    assert collective_of_op("nccl:_all_gather_base") == "all_gather" and collective_of_op("c10d::_reduce_scatter_base_") == "reduce_scatter"


def test_symmetric_memory_allreduce_counts_as_communication_only_in_fedge_mode(tmp_path, builder):
    b = builder().kernel("gemm", 0, 100).kernel("multimem_all_reduce_kernel<float>", 100, 50, stream=9)
    trace = load_trace(b.write(tmp_path / "t.json"))
    assert comm_comp_overlap(trace).rows[0].comm_us == 50
    assert comm_comp_overlap(trace, mode="hta").rows[0].overlap_pct is None  # HTA sees no communication
    assert temporal_breakdown(trace, mode="hta").rows[0].compute_us == 150


def test_collective_bytes_from_args_input_dims_or_unknown(tmp_path, builder):
    b = builder(rank=0)
    b.kernel(NCCL, 0, 100, stream=20, **{"In msg nelems": 1000, "dtype": "Float", "Group size": 4,
                                         "Collective name": "allreduce", "Process Group Name": "0",
                                         "Process Group Description": "default_pg"})
    # RCCL generic kernel launched inside nccl:all_to_all with record_shapes Input Dims
    b.cpu_op("nccl:all_to_all", 190, 30, cat="user_annotation", **{"Input Dims": [[256, 2]], "Input type": ["c10::Half"]})
    b.kernel("ncclDevKernel_Generic(ncclDevKernelArgsStorage<4096ul>)", 200, 10, stream=20, launch_ts=195)
    b.kernel("ncclKernel_Broadcast_RING_LL_Sum_int8_t(ncclDevComm*)", 300, 10, stream=20)
    rows = {r["collective"]: r for r in collectives(load_trace(b.write(tmp_path / "t.json"))).to_rows()}
    assert rows["all_reduce"]["total_bytes"] == 4000 and rows["all_reduce"]["group"] == "0 default_pg"
    assert rows["all_reduce"]["algbw_gbps"] == pytest.approx(0.04) and rows["all_reduce"]["busbw_gbps"] == pytest.approx(0.06)
    assert rows["all_to_all"]["total_bytes"] == 1024 and rows["all_to_all"]["size_source"] == "input dims"
    assert rows["broadcast"]["total_bytes"] is None and rows["broadcast"]["size_source"] == "unknown"


def test_wait_transfer_and_stragglers_across_ranks(tmp_path, builder):
    # rank 1 starts each all-reduce 300 us late; all end together (its clock is 1000 us ahead)
    for rank, (start, skew) in enumerate(((100, 0), (400, 1000))):
        b = builder(rank=rank)
        for i in range(4):
            t = i * 2000
            b.kernel(NCCL, t + start + skew, 600 - start, stream=20)
        b.write(tmp_path / f"rank{rank}.json")
    job = load_job(tmp_path, max_workers=1)
    wait = {w.rank: w for w in collectives(job).wait}
    assert wait[0].matched == 4 and wait[0].wait_us == pytest.approx(4 * 300) and wait[0].transfer_us == pytest.approx(4 * 200)
    assert wait[1].wait_us == 0 and wait[1].transfer_us == pytest.approx(4 * 200)
    report = stragglers(job)
    assert report.stragglers == [1] and report.rows[0].mean_delay_us == pytest.approx(300) and report.rows[0].times_last == 4


def test_idle_split_host_wait_vs_other(tmp_path, builder):
    b = builder()
    b.kernel("a", 0, 10, launch_ts=-20)
    b.kernel("b", 110, 10, launch_ts=50, launch_dur=10)  # gap [10,110): launch returned at 60 -> 50 host wait
    b.kernel("c", 200, 10, launch_ts=0)  # gap [120,200): queued long before -> other
    row = idle_time(load_trace(b.write(tmp_path / "t.json"))).rows[0]
    assert row.idle_us == 180 and row.host_wait_us == 50 and row.other_us == 130 and row.num_gaps == 2


def test_cpu_only_trace_reports_cpu_side_collectives(tmp_path, builder):
    b = builder(rank=None, distributedInfo={"backend": "gloo", "rank": 5, "world_size": 8})
    b.step(1, 0, 1000).step(2, 1000, 1000)
    b.cpu_op("aten::mm", 0, 400).cpu_op("c10d::allreduce_", 400, 10)
    b.cpu_op("gloo:all_reduce", 405, 300, tid=9, cat="user_annotation", **{"Input Dims": [[1000]], "Input type": ["float"]})
    b.cpu_op("aten::add", 600, 200)
    trace = load_trace(b.write(tmp_path / "t.json"))
    assert not trace.has_gpu
    t, o = temporal_breakdown(trace).rows[0], comm_comp_overlap(trace).rows[0]
    assert t.device == "cpu" and t.span_us == 800 and t.compute_us == 600
    assert o.comm_us == 305 and o.overlapped_comm_us == 105  # comm [400,705), compute [0,400)+[600,800)
    rows = collectives(trace).to_rows()
    assert rows[0]["collective"] == "all_reduce" and rows[0]["count"] == 1 and rows[0]["total_bytes"] == 4000
    recs = Recommend.run(load_job(tmp_path / "t.json"), Recommend.Config())
    assert recs.rows[0].id == "no-gpu"


def test_recommendations_name_strategies(tmp_path, builder):
    b = builder().kernel("gemm", 0, 100).kernel(NCCL, 100, 400, stream=20)  # comm fully exposed
    recs = Recommend.run(load_job(b.write(tmp_path / "t.json")), Recommend.Config())
    exposed = next(r for r in recs.rows if r.id == "exposed-communication")
    assert "ring-allreduce" in exposed.strategies and "80%" in exposed.message


def test_results_are_frozen_and_serialise(tmp_path, builder):
    tb = temporal_breakdown(_overlap_trace(tmp_path, builder))
    with pytest.raises(AttributeError):
        tb.mode = "hta"  # type: ignore[misc]
    assert tb.to_json()["rows"][0]["compute_pct"] == pytest.approx(48.39)


def test_config_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of fedge, hta"):
        Recommend.Config(mode="tb")
