"""The loader: columns, skipped events, formats (legacy, gzip, bare list, base time), rank discovery, chunking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedge.errors import DataError
from fedge.profiler import load_job, load_trace
from fedge.profiler.trace import KERNEL, MEMCPY, RUNTIME


def test_columns_hold_kept_events_and_skip_noise(tmp_path, builder):
    # Prepare
    b = builder(rank=3).step(1, 0, 100).noise(5)
    b.kernel("gemm", 20, 30).kernel("Memcpy HtoD (Pageable -> Device)", 60, 5, cat="gpu_memcpy")
    path = b.write(tmp_path / "t.json")
    # Execute
    trace = load_trace(path)
    # Assert
    assert trace.rank == 3 and trace.rank_source == "distributedInfo"
    assert trace.gpu.cat.tolist() == [KERNEL, MEMCPY]
    assert trace.gpu.ts.tolist() == [20, 60] and trace.gpu.tid.tolist() == [7, 7]
    assert [trace.names[i] for i in trace.gpu.name] == ["gemm", "Memcpy HtoD (Pageable -> Device)"]
    assert (trace.cpu.cat == RUNTIME).sum() == 2  # launches kept, python_function dropped
    assert "train.py(10): step" not in trace.names
    assert trace.steps.tolist() == [[0.0, 100.0, 1.0]]


def test_gzip_and_plain_load_the_same(tmp_path, builder):
    b = builder().step(1, 0, 100).kernel("gemm", 20, 30)
    plain, packed = load_trace(b.write(tmp_path / "a.json")), load_trace(b.write(tmp_path / "a.json.gz"))
    assert plain.gpu.ts.tolist() == packed.gpu.ts.tolist() and plain.names == packed.names


def test_tiny_chunks_give_the_same_columns(tmp_path, builder):
    # Prepare: names containing braces and commas must not fool the chunk splitter
    b = builder().step(1, 0, 1000)
    for i in range(50):
        b.kernel(f"k<{{i}}>, {{x}}, }}, {{ {i}", 10 + i * 10, 5)
    path = b.write(tmp_path / "t.json", indent=False)
    # Execute
    whole, chunked = load_trace(path), load_trace(path, chunk_bytes=64)
    # Assert
    assert chunked.gpu.ts.tolist() == whole.gpu.ts.tolist()
    assert [chunked.names[i] for i in chunked.gpu.name] == [whole.names[i] for i in whole.gpu.name]


def test_legacy_format_capitalised_categories_and_string_tids(tmp_path):
    events = [
        {"ph": "X", "cat": "Operator", "name": "ProfilerStep#5", "pid": 25738, "tid": "25738", "ts": 0, "dur": 500},
        {"ph": "X", "cat": "Runtime", "name": "cudaLaunchKernel", "pid": 25738, "tid": "25738", "ts": 10, "dur": 3,
         "args": {"correlation": 7, "external id": 1}},
        {"ph": "X", "cat": "Kernel", "name": "conv", "pid": 0, "tid": "stream 7", "ts": 20, "dur": 40,
         "args": {"correlation": 7, "device": 0}},
        {"ph": "X", "cat": "Memset", "name": "Memset (Device)", "pid": 0, "tid": "stream 9", "ts": 70, "dur": 2,
         "args": {"correlation": 8}},
    ]
    path = tmp_path / "worker4.1623143089861.pt.trace.json"
    path.write_text(json.dumps({"schemaVersion": 1, "traceEvents": events}))
    trace = load_trace(path)
    assert trace.rank == 4 and trace.rank_source == "file name" and trace.notes
    assert trace.gpu.tid.tolist() == [7, 9]  # stream from args, else from "stream N"
    assert trace.cpu.tid.tolist() == [25738, 25738]
    assert trace.steps[:, 2].tolist() == [5.0]


def test_base_time_bare_list_and_metadata_after_events(tmp_path):
    doc = '{"traceEvents": [{"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 1.5, "dur": 0.25, ' \
          '"args": {"stream": 7, "correlation": 1}}], "baseTimeNanoseconds": 1711964646000000000, "displayTimeUnit": "ns"}'
    (tmp_path / "a.json").write_text(doc)
    trace = load_trace(tmp_path / "a.json")
    assert trace.base_us == pytest.approx(1711964646000000.0) and trace.gpu.dur.tolist() == [0.25]
    (tmp_path / "b.json").write_text('[{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 1, "dur": 2}]')
    assert len(load_trace(tmp_path / "b.json").cpu) == 1


def test_huge_pg_config_is_summarised(tmp_path, builder):
    pg = [{"pg_name": str(i), "pg_desc": "x", "backend_config": "cpu:gloo", "pg_size": 300, "ranks": list(range(300))}
          for i in range(11)]
    b = builder(rank=None, distributedInfo={"backend": "gloo", "rank": 34, "world_size": 300, "pg_count": 71,
                                            "pg_config": pg}).step(1, 0, 10)
    trace = load_trace(b.write(tmp_path / "t.json"))
    assert trace.rank == 34 and trace.world_size == 300
    assert trace.metadata["distributedInfo"]["pg_config"][0]["ranks"] == 300


def test_job_without_ranks_uses_file_order_and_says_so(tmp_path, builder):
    for name in ("b.json", "a.json"):
        builder(rank=None).step(1, 0, 10).kernel("k", 1, 1).write(tmp_path / name)
    job = load_job(tmp_path, max_workers=2)
    assert job.ranks == [0, 1] and not job.errors
    assert all(t.rank_source == "file order" for t in job.traces)
    assert [t.path.endswith(n) for t, n in zip(job.traces, ("a.json", "b.json"))] == [True, True]


def test_job_with_duplicate_ranks_keeps_both(tmp_path, builder):
    for name in ("x.json", "y.json"):
        builder(rank=0).step(1, 0, 10).write(tmp_path / name)
    job = load_job(tmp_path, max_workers=1)
    assert job.ranks == [0, 1] and any("already taken" in n for t in job.traces for n in t.notes)


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_job(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no trace files"):
        load_job(tmp_path / "empty")


def test_gpu_columns_are_int64_for_large_correlation_ids(tmp_path, builder):
    b = builder().kernel("k", 1, 1)
    b.events[-1]["args"]["correlation"] = 2**40
    b.events[-2]["args"]["correlation"] = 2**40
    trace = load_trace(b.write(tmp_path / "t.json"))
    assert trace.gpu.corr.dtype == np.int64 and trace.gpu.corr[0] == 2**40


def test_orjson_fallback_and_odd_args_give_the_same_columns(tmp_path, builder, monkeypatch):
    # Prepare: one event with list args (valid JSON msgspec's typed decoder rejects) in a normal trace
    b = builder().step(1, 0, 100).kernel("gemm", 20, 30).kernel("relu", 60, 5)
    b.events.append({"ph": "X", "cat": "cpu_op", "name": "odd", "pid": 1, "tid": 1, "ts": 1, "dur": 1, "args": [1, 2]})
    path = b.write(tmp_path / "t.json")
    fast = load_trace(path)
    # Execute: without msgspec
    import fedge.profiler.trace as trace_module

    monkeypatch.setattr(trace_module, "_DECODER", None)
    slow = load_trace(path)
    # Assert
    for col in ("ts", "dur", "name", "cat", "tid", "device", "corr"):
        assert getattr(fast.gpu, col).tolist() == getattr(slow.gpu, col).tolist()
        assert getattr(fast.cpu, col).tolist() == getattr(slow.cpu, col).tolist()
    assert "odd" in fast.names
