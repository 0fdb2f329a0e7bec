"""`fedge edge fit` end to end: the default CNN, whose int8 export (64 KB, a 9 KB arena) is too big for a small
board, comes out as a smaller model that fits it, exported to int8 and verified on LiteRT and TFLite Micro; a board
nothing fits is one line; and the parts underneath (truncated SVD, students, distillation) on their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedge.cli.app import main

pytestmark = pytest.mark.edge

# Smaller than the default CNN's int8 export in both flash and RAM.
BOARDS = '[boards.tiny-m0]\nflash_kb = 32\nram_kb = 8\nnotes = "smaller than the default CNN needs"\n'
MAX_DROP_POINTS = 3.0
"""How far below the int8 teacher's held-out accuracy the chosen model may be."""


@pytest.fixture(scope="module")
def fitted(trained_run: Path, tmp_path_factory: pytest.TempPathFactory, lend_worker) -> tuple[int, Path, dict]:
    """One `fedge edge fit` run, checked by every test below: one low-rank and one distilled candidate."""
    tmp = tmp_path_factory.mktemp("fit")
    (tmp / "boards.toml").write_text(BOARDS)
    argv = ["edge", "fit", str(trained_run), "--target", "tiny-m0", "--boards", str(tmp / "boards.toml")]
    argv += ["--ranks", "0.25", "--widths", "0.5", "--epochs", "6", "--finetune-epochs", "1", "--out", str(tmp / "out")]
    with lend_worker():
        code = main(argv)
    return code, tmp / "out", json.loads((tmp / "out" / "fit-report.json").read_text())


def _rows(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["candidates"]}


def test_a_model_too_big_for_the_board_comes_out_fitting_within_the_stated_drop(
    fitted, trained_run: Path, tmp_path: Path, lend_worker
) -> None:
    code, _, report = fitted
    with lend_worker():  # the teacher exported on its own, as a user would
        assert main(["edge", "export", str(trained_run), "--quantize", "int8", "--out", str(tmp_path / "teacher")]) == 0
    teacher = json.loads((tmp_path / "teacher" / "edge-report.json").read_text())
    rows = _rows(report)
    chosen = rows[report["chosen"]]

    assert code == 0
    assert rows["as-is"]["fits"] is False and not rows["as-is"]["flash_ok"] and not rows["as-is"]["ram_ok"]
    assert report["fits_as_is"] is False and report["chosen"] != "as-is"
    assert chosen["fits"] and chosen["size_bytes"] <= 32 * 1024 and chosen["arena_bytes"] <= 8 * 1024
    assert report["teacher_accuracy_int8"] == rows["as-is"]["accuracy"] == teacher["accuracy_exported"] > 0.5
    assert rows["as-is"]["size_bytes"] == teacher["size_bytes"]
    assert chosen["accuracy"] >= report["teacher_accuracy_int8"] - MAX_DROP_POINTS / 100
    # Verified on both runtimes, like any export.
    assert chosen["runtimes_agreed"] is True and chosen["accuracy_tflm"] == chosen["accuracy"]


def test_the_frontier_shows_size_arena_and_accuracy_of_each_method_and_picks_the_best_that_fits(fitted) -> None:
    _, _, report = fitted
    rows = _rows(report)

    assert list(rows) == ["as-is", "low-rank-0.25", "distill-0.5"]
    assert rows["low-rank-0.25"]["setting"]["ranks"] and rows["distill-0.5"]["setting"]["config"]["channels"] == [
        16,
        32,
    ]
    for row in rows.values():
        assert row["exported"] and row["size_bytes"] > 0 and row["arena_bytes"] > 0 and 0 < row["accuracy"] <= 1
        assert row["params"] < rows["as-is"]["params"] or row["name"] == "as-is"
        assert row["size_bytes"] < rows["as-is"]["size_bytes"] or row["name"] == "as-is"
    best = max((r for r in rows.values() if r["fits"]), key=lambda r: (r["accuracy"], -r["size_bytes"]))
    assert report["chosen"] == best["name"]


def test_the_chosen_model_is_written_as_an_export_writes_it(fitted, digits, tmp_path: Path, compile_c_array) -> None:
    from fedge.edge import load_edge_model
    from fedge.plugins.models import load_model, model_spec

    _, out, report = fitted
    chosen = _rows(report)[report["chosen"]]
    edge_report = json.loads((out / "edge-report.json").read_text())
    tflite = (out / "model.tflite").read_bytes()
    parsed, build = compile_c_array(out, tmp_path)

    assert edge_report["fits"] is True and edge_report["board"]["name"] == "tiny-m0"
    assert edge_report["fit_candidate"] == report["chosen"] and edge_report["size_bytes"] == len(tflite)
    assert len(tflite) == chosen["size_bytes"]  # the file on disk is the chosen candidate's
    assert parsed == tflite
    assert build.returncode == 0, build.stderr
    # The file on disk answers as the report says, run again here on LiteRT.
    accuracy = float((load_edge_model(out / "model.tflite")(digits.x_test).argmax(1) == digits.y_test).mean())
    assert accuracy == chosen["accuracy"]
    if chosen["method"] == "distill":  # a student is a plugin model: its run directory is a MODEL again
        student = load_model(out)
        assert model_spec(student)["config"]["channels"] == chosen["setting"]["config"]["channels"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["name"] for m in metrics] == ["as-is", "low-rank-0.25", "distill-0.5"]


def test_a_board_nothing_fits_is_one_line_with_the_smallest_size_reached(
    trained_run: Path, tmp_path: Path, lend_worker, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 2 KB of flash is less than any candidate's weights, so only the teacher is exported
    (tmp_path / "boards.toml").write_text("[boards.speck]\nflash_kb = 2\nram_kb = 1\n")
    argv = ["edge", "fit", str(trained_run), "-t", "speck", "--boards", str(tmp_path / "boards.toml")]
    argv += ["--ranks", "0.25", "--widths", "0.25", "--out", str(tmp_path / "out")]

    # Execute
    with lend_worker():
        code = main(argv)

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    report = json.loads((tmp_path / "out" / "fit-report.json").read_text())
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0], err
    size = _rows(report)["as-is"]["size_bytes"]
    assert "nothing fits speck: the smallest model reached (as-is) needs" in err[0] and f"{size:,} B" in err[0]
    assert "2 smaller candidate(s)" in err[0] and "2,048 B of flash" in err[0]
    assert report["chosen"] is None and not (tmp_path / "out" / "model.tflite").exists()
    assert [c["exported"] for c in report["candidates"]] == [True, False, False]


def test_truncated_svd_keeps_the_best_low_rank_weights_and_the_classifier_whole() -> None:
    from fedge.edge.low_rank import factorize, num_params

    # Prepare
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.Linear(64, 10))
    x = torch.randn(5, 3, 4, 4)

    # Execute
    small, ranks = factorize(model, 0.25)

    # Assert: each factor pair is the rank-r truncation of its layer (Eckart-Young), the bias kept
    assert ranks == {"0": 4, "2": 16} and isinstance(small[3], nn.Linear)
    w = model[2].weight.detach()
    u, s, vh = torch.linalg.svd(w)
    best = u[:, :16] @ torch.diag(s[:16]) @ vh[:16]
    torch.testing.assert_close(small[2][1].weight @ small[2][0].weight, best, atol=1e-5, rtol=1e-4)
    conv = small[0][1].weight.flatten(1) @ small[0][0].weight.flatten(1)
    cu, cs, cvh = torch.linalg.svd(model[0].weight.detach().flatten(1))
    torch.testing.assert_close(conv, cu[:, :4] @ torch.diag(cs[:4]) @ cvh[:4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(small[0][1].bias, model[0].bias)
    assert small[0](x).shape == model[0](x).shape and num_params(small) < num_params(model)
    assert model[2].weight.shape == (64, 256)  # the original is left as it was


def test_students_scale_the_width_fields_of_the_model_config() -> None:
    from fedge.edge.distill import student_options

    assert student_options({"channels": [32, 64], "hidden": 128, "seed": 3}, 0.25) == {
        "channels": [8, 16],
        "hidden": 32,
        "seed": 3,
    }
    assert student_options({"hidden": [128, 64], "dtype": "float32"}, 0.01)["hidden"] == [1, 1]
    assert student_options({"bias": True}, 0.5) is None  # nothing to narrow: no student


def test_distillation_is_seeded_and_learns_from_the_teacher(digits) -> None:
    from fedge.edge.distill import DistillConfig, distill, teacher_logits
    from fedge.plugins.models import build_model

    # Prepare
    teacher = build_model("mlp", {"hidden": [32]}, input_shape=digits.input_shape, num_classes=10)
    soft = teacher_logits(teacher, digits.x_train[:256])
    cfg = DistillConfig(epochs=2, alpha=1.0, seed=1)

    def student() -> nn.Module:
        return build_model("mlp", {"hidden": [8]}, input_shape=digits.input_shape, num_classes=10)

    @torch.no_grad()
    def gap(model: nn.Module) -> float:  # KL(teacher || student) on the training samples
        out = model(torch.as_tensor(digits.x_train[:256])).log_softmax(1)
        return float(torch.nn.functional.kl_div(out, soft.log_softmax(1), log_target=True, reduction="batchmean"))

    # Execute
    threads = torch.get_num_threads()
    a, b = student(), student()
    before = gap(a)
    distill(a, soft, digits.x_train[:256], digits.y_train[:256], cfg)
    distill(b, soft, digits.x_train[:256], digits.y_train[:256], cfg)

    # Assert: the same seed gives the same student, and it moved towards the teacher's outputs
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    after = gap(a)
    assert np.isfinite(after) and after < before
    assert torch.get_num_threads() == threads  # distillation's single thread is given back


def test_a_student_config_the_plugin_refuses_is_a_skipped_candidate(trained_run: Path) -> None:
    from fedge.edge.fit import Candidate, FitConfig, FitWorkflow

    def refused() -> nn.Module:
        raise ValueError("d_model must be divisible by num_heads")

    workflow = FitWorkflow(trained_run, FitConfig(target="xiao-samd21"))
    candidate = Candidate("distill-0.3", "distill", {"width": 0.3}, make=refused, train=lambda model: None)

    trial = workflow.attempt(candidate, None, None)  # type: ignore[arg-type]  # refused before either is read

    assert trial.exported is None and not trial.eligible
    assert trial.to_json(0.9)["reason"] == "cannot build it: d_model must be divisible by num_heads"
