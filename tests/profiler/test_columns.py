"""Compact columns: every value comes back exactly whatever the encoding, and the block-at-a-time sweeps give
what the whole-array ones give."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.errors import DataError
from fedge.profiler import build_report, columns, load_trace, timeline
from fedge.profiler.columns import Exact, FloatColumn, IntColumn
from fedge.profiler.kinds import KernelKind


@pytest.fixture(params=[True, False], ids=["remapped", "numpy-array"])
def store(request, monkeypatch) -> None:
    """Columns grown by mremap (Linux) and as numpy arrays (where the OS has no mremap)."""
    monkeypatch.setattr(columns, "_REMAP", request.param)


def _floats(chunks: list[list[float]], *, relative: bool) -> tuple[list[float], int]:
    column = FloatColumn(relative=relative)
    for chunk in chunks:
        column.extend(chunk)
    stored = column.finish()
    return stored.get().tolist(), stored.scale


def test_whole_us_then_ns_then_huge_values_come_back_exactly(store):
    # Prepare: whole µs (4 bytes), then ns-precision decimals (still 4 bytes), then an epoch in ns decimals
    whole = [1_700_000_000_000_000 + i * 45 for i in range(5)]
    ns = [4458676388068.751, 4458676388069.003, 4458676388070.5]
    # Execute / Assert: each stage keeps every earlier value exact
    assert _floats([whole], relative=True) == ([float(v) for v in whole], 1)
    values, scale = _floats([[1.0, 2.5], [0.25, 3.125]], relative=False)
    assert values == [1.0, 2.5, 0.25, 3.125] and scale == 1000
    values, scale = _floats([ns[:1], ns[1:]], relative=True)
    assert values == ns and scale == 1000
    values, scale = _floats([whole, ns], relative=True)  # 2e15 µs in ns steps would not be exact: float64
    assert values == [float(v) for v in whole] + ns and scale == 0
    values, scale = _floats([[0.1, 1e-7, 3.0]], relative=False)
    assert values == [0.1, 1e-7, 3.0] and scale == 0


def test_integers_widen_as_needed_and_a_constant_column_takes_no_memory(store):
    grown = IntColumn()
    for i in range(0, 200_000, 1000):  # past the first map / array: grown in place
        grown.extend(list(range(i, i + 1000)))
    assert grown.finish().tolist() == list(range(200_000))
    column = IntColumn()
    column.extend([1, -1, 7])
    column.extend([2**40])
    values = column.finish()
    assert values.dtype == np.int64 and values.tolist() == [1, -1, 7, 2**40]
    constant = IntColumn()
    constant.extend([3] * 1000)
    same = constant.finish()
    assert same.tolist() == [3] * 1000 and same.strides == (0,)


@pytest.mark.slow
def test_block_at_a_time_sweeps_equal_the_whole_array_ones(monkeypatch, shared_job):
    # Prepare: the largest shared single-rank trace, swept whole and in blocks of 97 kernels
    job = shared_job("hta-v100-2gpu-rank1-large")
    whole = {mode: build_report(job, mode=mode) for mode in ("fedge", "hta")}
    # Execute
    monkeypatch.setattr(timeline, "BLOCK", 97)
    blocked = {mode: build_report(job, mode=mode) for mode in ("fedge", "hta")}
    # Assert: the same report (block sums add in another order: numbers equal to 1e-9)
    for mode, report in whole.items():
        expected, found = dict(_leaves(report)), dict(_leaves(blocked[mode]))
        assert found.keys() == expected.keys()
        for path, value in expected.items():
            assert found[path] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), (mode, path)


def test_a_union_of_several_kinds_in_blocks_takes_equal_starts_in_kind_order(monkeypatch):
    # Prepare: comp [10, 20], comm [10, 9] (HTA mode rounds sub-µs kernels into ends before starts), comp [30, 31]
    ts, end = np.array([10.0, 10.0, 30.0]), np.array([20.0, 9.0, 31.0])
    comp, comm = int(KernelKind.COMPUTATION), int(KernelKind.COMMUNICATION)
    k = timeline.Kernels(
        ts_exact=Exact(ts), end_exact=Exact(end), kind=np.array([comp, comm, comp], dtype=np.int8),
        stream=np.zeros(3, dtype=np.int8), name=np.zeros(3, dtype=np.int8), row=np.arange(3), by_ts=np.arange(3),
    )  # fmt: skip
    whole = k.union_us(KernelKind.COMMUNICATION, KernelKind.COMPUTATION)
    # Execute
    monkeypatch.setattr(timeline, "BLOCK", 2)
    blocked = k.union_us(KernelKind.COMMUNICATION, KernelKind.COMPUTATION)
    # Assert: the same as union_us of the concatenated intervals, swept whole or in blocks
    assert blocked == whole == timeline.union_us(np.r_[ts[1], ts[[0, 2]]], np.r_[end[1], end[[0, 2]]])


def _leaves(value: object, path: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, value)]


def test_an_id_beyond_64_bits_is_one_clear_error(tmp_path, builder):
    b = builder().kernel("k", 1, 1)
    b.events[-1]["args"]["correlation"] = 2**70
    with pytest.raises(DataError, match="not a valid trace"):
        load_trace(b.write(tmp_path / "t.json"))
