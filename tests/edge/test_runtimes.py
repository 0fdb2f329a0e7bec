"""The runtime layer under `fedge edge export`: arena probing that survives a TFLM crash, and tracing a difference
between LiteRT and TFLM to the op that produced it."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge.runtimes import (
    _litert_outputs,
    _probe,
    _tflm_outputs,
    find_arena_bytes,
    first_difference,
    run_litert,
    run_tflm,
    with_every_op_output,
)

pytestmark = pytest.mark.edge


@pytest.fixture(scope="module")
def mlp_int8(digits, conversion_worker):
    """An int8 MLP (only FULLY_CONNECTED ops): TFLM segfaults on it with a too-small arena."""
    from fedge.edge.convert import export_tflite
    from fedge.plugins.models import build_model

    model = build_model("mlp", {}, input_shape=digits.input_shape, num_classes=digits.num_classes)
    edge = export_tflite(model, digits.x_train, quantization="int8", calibration_samples=50, worker=conversion_worker)
    return edge, edge.quantize_inputs(digits.x_test[:40])


def test_arena_probe_survives_a_tflm_crash(mlp_int8) -> None:
    edge, x = mlp_int8

    ok, log = _probe(edge.data, 128, x[:1])  # TFLM dies with SIGSEGV here rather than failing

    assert ok is False
    assert "arena" in log.lower() or "crashed" in log


def test_arena_search_finds_a_size_that_runs(mlp_int8) -> None:
    edge, x = mlp_int8

    smallest, with_margin = find_arena_bytes(edge.data, x[:1])

    assert 0 < smallest < with_margin and with_margin % 1024 == 0
    assert run_tflm(edge.data, x, arena_bytes=smallest).shape == (len(x), 10)


def test_every_op_output_copy_ends_with_the_models_own_output(mlp_int8) -> None:
    edge, x = mlp_int8

    probe, produced = with_every_op_output(edge.data)
    litert, tflm = _litert_outputs(probe, x), _tflm_outputs(probe, x, arena_bytes=256 * 1024)

    assert [op for _, op, _ in produced].count("FULLY_CONNECTED") == 3
    assert [i for i, _, _ in produced] == sorted(i for i, _, _ in produced)  # execution order
    assert len(litert) == len(tflm) == len(produced)
    np.testing.assert_array_equal(litert[-1], run_litert(edge.data, x))
    np.testing.assert_array_equal(tflm[-1], run_tflm(edge.data, x, arena_bytes=64 * 1024))


def test_first_difference_names_the_earliest_op_that_differs() -> None:
    produced = [(0, "CONV_2D", "a"), (1, "FULLY_CONNECTED", "b"), (2, "FULLY_CONNECTED", "c")]
    same = np.zeros((3, 4), np.int8)
    off = same.copy()
    off[1, 2] = 1
    off[2, 0] = -1

    assert first_difference(produced, [same, same, same], [same, same, same]) is None
    assert first_difference(produced, [same, same, off], [same, off, same]) == {
        "op_index": 1,
        "op": "FULLY_CONNECTED",
        "tensor": "b",
        "samples": 2,
        "max_abs_diff": 1.0,
    }
