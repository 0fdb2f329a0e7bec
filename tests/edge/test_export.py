"""End to end: the default CNN trained on digits, exported by `fedge edge export` at every quantization and run on
the real LiteRT and TFLite Micro runtimes; the errors a user can hit, each one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.cli.app import main

pytestmark = pytest.mark.edge

BOARD = "arduino-nano-33-ble-sense"
FLAGS = {
    # float32 with a board runs on TFLM too; generic checks no limits.
    "none": ("--quantize", "none", "--target", "generic"),
    "float16": ("--quantize", "float16"),
    "dynamic": ("--quantize", "dynamic"),
    "int8": ("--quantize", "int8", "--target", BOARD),
}


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "edge-report.json").read_text())


@pytest.mark.parametrize("quantization", list(FLAGS))
def test_default_cnn_exports_at_every_quantization_and_keeps_its_accuracy(export_run, quantization: str) -> None:
    # Execute
    code, run_dir = export_run(*FLAGS[quantization])

    # Assert
    assert code == 0
    for name in ("model.tflite", "model_data.cc", "model_data.h", "edge-report.json", "config.toml"):
        assert (run_dir / name).is_file(), name
    report = _report(run_dir)
    assert report["quantization"] == quantization
    assert report["size_bytes"] == (run_dir / "model.tflite").stat().st_size
    assert report["held_out_samples"] == 360
    assert report["accuracy_source"] > 0.5  # trained, not chance
    assert report["accuracy_source"] - report["accuracy_exported"] <= 0.01
    assert report["runtimes"]["litert"]["ran"]


def test_int8_is_small_fits_the_board_and_litert_and_tflm_agree(export_run) -> None:
    # Execute
    _, int8_dir = export_run(*FLAGS["int8"])
    _, float_dir = export_run(*FLAGS["none"])

    # Assert
    int8, fp32 = _report(int8_dir), _report(float_dir)
    assert int8["input"]["dtype"] == "int8" and int8["output"]["dtype"] == "int8"
    # Weights shrink 4x; per-channel scales/zero points and the flatbuffer's per-tensor tables do not
    # (see docs/edge.md), so the ratio sits just under 0.3 on the default 53k-parameter CNN.
    assert int8["size_bytes"] <= 0.3 * fp32["size_bytes"]
    tflm = int8["runtimes"]["tflm"]
    agreement = int8["runtimes"]["agreement"]
    assert tflm["ran"] and int8["runtimes"]["agreed"] is True
    assert agreement["same_predictions"] == agreement["samples"] == 360
    assert agreement["max_abs_diff"] <= 1  # one int8 step: FULLY_CONNECTED requantization rounding
    if agreement["identical_outputs"] < agreement["samples"]:
        first = agreement["first_difference"]
        assert first["op"] == "FULLY_CONNECTED" and first["max_abs_diff"] == 1
        assert 1 <= first["samples"] <= agreement["samples"] - agreement["identical_outputs"]
    else:
        assert "first_difference" not in agreement
    assert tflm["accuracy"] == int8["accuracy_exported"]
    assert int8["arena_min_bytes"] < int8["arena_bytes"] < 64 * 1024
    assert int8["board"]["name"] == BOARD and int8["fits"] is True
    assert fp32["runtimes"]["tflm"]["ran"] and fp32["arena_bytes"] > int8["arena_bytes"]


@pytest.mark.parametrize("quantization", ["float16", "dynamic"])
def test_float16_and_dynamic_say_tflm_cannot_run_them(export_run, quantization: str) -> None:
    _, run_dir = export_run(*FLAGS[quantization])

    report = _report(run_dir)

    assert report["runtimes"]["tflm"] == {"ran": False, "reason": f"TFLite Micro has no {quantization} kernels"}
    assert report["arena_bytes"] is None and report["runtimes"]["agreed"] is None
    assert report["size_bytes"] < _report(export_run(*FLAGS["none"])[1])["size_bytes"]


def test_c_array_equals_the_tflite_file_and_compiles_with_gcc(export_run, tmp_path: Path, compile_c_array) -> None:
    # Prepare
    _, run_dir = export_run(*FLAGS["int8"])
    source = (run_dir / "model_data.cc").read_text()

    # Execute
    parsed, build = compile_c_array(run_dir, tmp_path)

    # Assert
    assert parsed == (run_dir / "model.tflite").read_bytes()
    assert build.returncode == 0, build.stderr
    assert "aligned(16)" in source


def test_exported_float_model_is_callable_and_matches_torch(export_run, trained_run: Path, digits) -> None:
    import torch

    from fedge.edge import Quantization, load_edge_model
    from fedge.plugins.models import load_model

    # Prepare
    _, run_dir = export_run(*FLAGS["none"])
    edge = load_edge_model(run_dir / "model.tflite")
    model = load_model(trained_run).eval()

    # Execute
    got = edge(digits.x_test[:50])
    with torch.no_grad():
        want = model(torch.as_tensor(digits.x_test[:50])).numpy()

    # Assert
    assert edge.quantization is Quantization.NONE
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_inspect_lists_ops_tensors_and_int8_quantization(export_run, capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir = export_run(*FLAGS["int8"])

    code = main(["edge", "inspect", str(run_dir / "model.tflite"), "--json"])

    info = json.loads(capsys.readouterr().out)
    assert code == 0
    assert info["quantization"] == "int8"
    assert info["ops"]["FULLY_CONNECTED"] == 2 and info["tflm_unsupported"] == []
    assert info["inputs"][0]["dtype"] == "int8" and len(info["inputs"][0]["scales"]) == 1


def test_a_model_too_big_for_the_board_is_one_line_with_the_sizes(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], lend_worker
) -> None:
    # Prepare
    boards = tmp_path / "boards.toml"
    boards.write_text('[boards.tiny]\nflash_kb = 16\nram_kb = 2\nnotes = "too small"\n')
    out = tmp_path / "out"

    # Execute
    with lend_worker():
        code = main(
            [
                "edge",
                "export",
                str(trained_run),
                "--quantize",
                "none",  # float32 converts faster than int8, and is as far from fitting
                "--target",
                "tiny",
                "--boards",
                str(boards),
                "--out",
                str(out),
            ]
        )

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "model does not fit tiny" in err[0]
    assert "B of flash, the board has 16,384 B" in err[0] and "B of RAM, the board has 2,048 B" in err[0]
    assert _report(out)["fits"] is False


def test_an_op_tflm_lacks_is_named(digits, conversion_worker) -> None:
    from torch import nn

    from fedge.edge import export_tflite
    from fedge.edge.verify import verify
    from fedge.errors import DataError

    # Prepare: GELU converts for LiteRT, but TFLM has no GELU kernel
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.GELU())
    edge = export_tflite(model, digits.x_train[:8], worker=conversion_worker)

    # Execute
    check = verify(edge, digits.x_test[:20], digits.y_test[:20], require_tflm=True)

    # Assert
    assert isinstance(check.problem, DataError)
    assert "TFLite Micro has no kernel for op(s) GELU" in str(check.problem)
    assert check.runtimes["litert"]["ran"] and not check.runtimes["tflm"]["ran"]


def test_a_layer_litert_torch_cannot_convert_is_named(digits, conversion_worker) -> None:
    import torch
    from torch import nn

    from fedge.edge import export_tflite
    from fedge.errors import DataError

    class Erfinv(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.erfinv(x * 0.5)

    with pytest.raises(DataError, match=r"at layer '1' \(Erfinv, aten\.erfinv\).*Lowering not found"):
        export_tflite(nn.Sequential(nn.Conv2d(1, 4, 3), Erfinv()), digits.x_train[:4], worker=conversion_worker)


def test_a_converter_crash_becomes_one_clear_error(monkeypatch: pytest.MonkeyPatch, digits) -> None:
    from torch import nn

    from fedge.edge import convert
    from fedge.errors import RuntimeFailure

    # Prepare: a child that dies of SIGSEGV, as the TFLite converter did on a Keras LSTM
    monkeypatch.setattr(convert, "_CHILD_CODE", "import ctypes; ctypes.string_at(0)")

    # Execute / Assert
    with pytest.raises(
        RuntimeFailure, match=r"the TFLite converter crashed \(signal 11\) converting the model to int8"
    ):
        convert.export_tflite(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits.x_train[:4], quantization="int8")
