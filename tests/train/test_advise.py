"""``fedge advise``: the alpha-beta fit, the ranking it gives, the command end to end, and its bad inputs."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest

from fedge.cli.app import main
from fedge.plugins.train import advise
from fedge.plugins.train.advise import _check_rows, _summary
from fedge.plugins.train.cost_model import (
    Prediction,
    UnitCost,
    fit_alpha_beta,
    fit_collectives,
    fit_per_unit,
    predict,
    rank,
)

SIZES = [4096 * 4**i for i in range(7)]  # 4 KB .. 16 MB, as the calibration measures


@pytest.mark.parametrize(("alpha", "beta"), [(50e-6, 1 / 2e9), (1e-3, 1 / 0.2e9), (0.0, 1 / 5e9)])
def test_the_fit_recovers_known_latency_and_bandwidth(alpha: float, beta: float) -> None:
    rng = random.Random(0)
    points = [(n, (alpha + beta * n) * (1 + rng.uniform(-0.02, 0.02))) for n in SIZES for _ in range(3)]

    fit = fit_alpha_beta(points)

    assert fit.beta_s_per_byte == pytest.approx(beta, rel=0.03)
    assert fit.alpha_s == pytest.approx(alpha, rel=0.05, abs=2e-6)
    assert fit.max_rel_error < 0.05


def test_the_fit_drops_a_point_another_process_delayed() -> None:
    alpha, beta = 100e-6, 1 / 1e9
    points = [(n, alpha + beta * n) for n in SIZES]
    points[1] = (SIZES[1], 20 * points[1][1])  # descheduled while it waited

    fit = fit_alpha_beta(points)

    assert fit.alpha_s == pytest.approx(alpha, rel=1e-6) and fit.beta_s_per_byte == pytest.approx(beta, rel=1e-6)


def test_the_fit_needs_two_sizes_and_positive_times() -> None:
    from fedge.errors import ConfigError

    with pytest.raises(ConfigError, match="two or more buffer sizes"):
        fit_alpha_beta([(4096, 1e-4), (4096, 2e-4)])
    with pytest.raises(ConfigError, match="positive, finite times"):
        fit_alpha_beta([(4096, 1e-4), (8192, 0.0)])


def _rows(costs: dict[str, tuple[float, float]]) -> list[dict]:
    return [{"impl": impl, "bytes": n, "algbw_gbps": n / (a + b * n) / 1e9} for impl, (a, b) in costs.items() for n in SIZES]


def test_small_gradients_favour_the_low_latency_collective_and_large_ones_the_high_bandwidth_one() -> None:
    # Prepare: tree has the least latency, native the most bandwidth
    fits = fit_collectives(_rows({"native": (400e-6, 1 / 2e9), "ring": (900e-6, 1 / 1.5e9), "tree": (100e-6, 1 / 0.5e9),
                                  "parameter-server": (300e-6, 1 / 0.4e9)}))  # fmt: skip
    assert fits["tree"].alpha_s == pytest.approx(100e-6, rel=1e-6)
    compute = {"dp": 1e-3, "ps": 2e-3}
    fsdp = UnitCost(unit_s=2e-3, beta_s_per_byte=1 / 1e9)
    # Execute
    small = rank(predict(fits, grad_bytes=40e3, num_units=4, compute_s=compute, world_size=2, fsdp=fsdp))
    large = rank(predict(fits, grad_bytes=40e6, num_units=4, compute_s=compute, world_size=2, fsdp=fsdp))
    # Assert
    assert small[0].strategy == "tree-allreduce"
    assert "latency bound" in small[0].reason
    assert large[0].strategy == "allreduce"
    assert "bandwidth bound" in large[0].reason
    assert {p.strategy for p in small} == {"allreduce", "ring-allreduce", "tree-allreduce", "parameter-server", "fsdp"}
    assert small[-1].step_s >= small[0].step_s
    fsdp_small = next(p for p in small if p.strategy == "fsdp")
    assert fsdp_small.comm_s == pytest.approx(4 * 2e-3 + 40e3 / 1e9 + 400e-6 + 4 / 2e9, rel=1e-3)  # units, bytes, loss


def test_a_wake_up_is_paid_once_per_call_and_allreduce_pays_alpha_per_bucket() -> None:
    fits = fit_collectives(_rows({"native": (100e-6, 1 / 1e9), "tree": (50e-6, 1 / 1e9)}))
    compute = {"dp": 1e-3}

    woken = {p.strategy: p for p in predict(fits, grad_bytes=1e3, num_units=2, compute_s=compute, world_size=2,
                                             wake_s={"native": 300e-6, "tree": 0.0})}  # fmt: skip
    large = {p.strategy: p for p in predict(fits, grad_bytes=(1 << 20) + (25 << 20) + 1e6, num_units=2,
                                            compute_s=compute, world_size=2)}  # fmt: skip

    assert woken["allreduce"].comm_s == pytest.approx(100e-6 + 1e3 / 1e9 + 300e-6, rel=1e-3)
    assert woken["tree-allreduce"].comm_s == pytest.approx(50e-6 + 1e3 / 1e9, rel=1e-3)
    # three buckets (1 MiB, 25 MiB, 1 MB): three alphas; tree sends it in one call
    assert large["allreduce"].comm_s == pytest.approx(3 * 100e-6 + ((1 << 20) + (25 << 20) + 1e6) / 1e9, rel=1e-3)
    assert large["tree-allreduce"].comm_s == pytest.approx(50e-6 + ((1 << 20) + (25 << 20) + 1e6) / 1e9, rel=1e-3)
    assert "(3 x alpha 300 us vs" in large["allreduce"].reason and "(alpha 50 us vs" in large["tree-allreduce"].reason
    assert "the fit is within 0% of its points" in large["tree-allreduce"].reason  # exact rows, an exact fit
    assert "fsdp" not in large  # no per-unit measurement, no fsdp prediction


def test_the_unit_fit_separates_per_unit_from_per_byte_costs() -> None:
    points = [(3, 33e3, 3 * 4e-3 + 33e3 * 2e-9), (7, 100e3, 7 * 4e-3 + 100e3 * 2e-9), (3, 2.1e6, 3 * 4e-3 + 2.1e6 * 2e-9)]

    fit = fit_per_unit(points)

    assert fit.unit_s == pytest.approx(4e-3, rel=1e-6) and fit.beta_s_per_byte == pytest.approx(2e-9, rel=1e-6)
    assert fit_per_unit([(3, 1e3, 3e-3), (6, 1e3, 6e-3)]).unit_s == pytest.approx(1e-3, rel=0.01)


def test_check_rows_and_summary_on_a_known_case() -> None:
    predictions = [Prediction("allreduce", 0.012, 0.01, 0.002, ""), Prediction("fsdp", 0.005, 0.004, 0.001, ""),
                   Prediction("tree-allreduce", 0.009, 0.008, 0.001, "")]  # fmt: skip
    measured = {"allreduce": 0.010, "fsdp": 0.010, "tree-allreduce": 0.012}

    rows = _check_rows(predictions, measured)
    summary = _summary(rows)

    assert [(r["strategy"], round(r["error_pct"], 6)) for r in rows] == [("allreduce", 20.0), ("fsdp", -50.0), ("tree-allreduce", -25.0)]
    assert summary == {"fastest_predicted": "fsdp", "fastest_measured": "allreduce", "fastest_right": False,
                       "median_abs_error_pct": pytest.approx(25.0)}  # fmt: skip


def _calibration(path: Path, nproc: int, *, sizes: list[int] = SIZES, reps: int = 5) -> Path:
    rows = _rows({"native": (200e-6, 1 / 1e9), "ring": (600e-6, 1 / 1e9), "tree": (150e-6, 1 / 0.5e9),
                  "parameter-server": (300e-6, 1 / 0.5e9)})  # fmt: skip
    fsdp_rows = [{"kind": "fsdp", "units": u, "bytes": n, "extra_s": u * 5e-3 + n / 1e9} for u, n in [(3, 4e4), (7, 1e5), (3, 2e6)]]
    record = {"world_size": nproc, "host": socket.gethostname(), "sizes": sizes, "reps": reps, "method": advise._METHOD, "rows": rows,
              "fsdp_rows": fsdp_rows}
    path.write_text(json.dumps(record))
    return path


@pytest.mark.multiproc
def test_advise_reuses_a_stored_calibration_ranks_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cal = _calibration(tmp_path / "cal.json", 2)

    code = main(["advise", "mlp", "--nproc", "2", "-m", "hidden=16", "--calibration", str(cal), "--out", str(tmp_path / "a")])

    out = capsys.readouterr()
    assert code == 0, out.err
    lines = out.out.splitlines()
    assert lines[0].startswith("mlp on 2 processes, global batch 64 (0.00 MB of gradients), fastest first:")
    ranked = [line.split(":")[0].split(". ")[1] for line in lines[1:]]
    assert sorted(ranked) == ["allreduce", "fsdp", "parameter-server", "ring-allreduce", "tree-allreduce"]
    assert ranked[0] == "tree-allreduce" and "latency bound" in lines[1]  # the least alpha wins on 3 KB
    advice = json.loads((tmp_path / "a" / "advice.json").read_text())
    assert advice["ranking"][0]["strategy"] == "tree-allreduce"
    assert "measuring collectives" not in out.err  # reused, not measured
    assert "measuring mlp's compute on 2 processes" in out.err


@pytest.mark.multiproc
def test_advise_check_measures_both_sides_on_this_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A calibration stored at other --sizes and --reps is measured again, not reused.
    cal = _calibration(tmp_path / "cal.json", 2, sizes=[4096, 65536], reps=5)

    code = main(["advise", "mlp", "--nproc", "2", "-m", "hidden=16", "--calibration", str(cal), "--check", "--json",
                 "--sizes", "4KB,64KB", "--reps", "1", "--out", str(tmp_path / "a")])  # fmt: skip

    out = capsys.readouterr()
    assert code == 0, out.err
    assert "measuring collectives" in out.err
    assert "measuring mlp's compute" not in out.err  # timed by the calibration's processes, no job of its own
    result = json.loads(out.out)
    stored = json.loads(cal.read_text())  # stored for the next advise
    assert (stored["world_size"], stored["sizes"], stored["reps"]) == (2, [4096, 65536], 1)
    assert {r["units"] for r in stored["fsdp_rows"]} == {3, 7} and all("wake_us" in r for r in stored["rows"])
    assert set(result["compute_s"]) == {"dp", "ps"} and all(t > 0 for t in result["compute_s"].values())
    checked = {r["strategy"]: r for r in result["check"]}
    assert set(checked) == {p["strategy"] for p in result["ranking"]}
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in checked.values())
    assert result["check_summary"]["fastest_measured"] in checked


def test_an_out_holding_a_run_is_refused_before_anything_is_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedge.rundir import RunDir

    RunDir.create("advise", tmp_path / "a")
    cal = tmp_path / "cal.json"  # none stored: advise would have to measure the collectives

    code = main(["advise", "mlp", "--nproc", "2", "--calibration", str(cal), "--out", str(tmp_path / "a")])

    err = capsys.readouterr().err
    assert code == 1, err
    assert "already holds" in err and "advise run" in err and len(err.strip().splitlines()) == 1, err
    assert not cal.exists() and "measuring" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-model"], "unknown model"),
        (["mlp", "--nproc", "1"], "--nproc must be >= 2"),
        (["mlp", "--nproc", "3"], "--batch-size 64 must be divisible by --nproc 3"),
        (["mlp", "-m", "hidden=0"], "hidden widths must be >= 1"),
        (["mlp", "-m", "depth=3"], "unknown setting"),
        (["mlp", "-m", "hidden"], "--model-option takes KEY=VALUE"),
        (["mlp", "--calibration", "{tmp}/bad.json"], "is not a fedge collectives calibration"),
        (["mlp", "--sizes", "4KB"], "--sizes needs two or more sizes"),
        (["mlp", "--sizes", "4XB,8KB"], "bad size '4XB'"),
        (["mlp", "--reps", "0"], "--reps must be >= 1"),
    ],
)
def test_advise_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch, args, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")

    code = main(["advise", *[a.replace("{tmp}", str(tmp_path)) for a in args]])

    err = capsys.readouterr().err
    assert code == 1, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_other_sizes_or_reps_get_a_calibration_file_of_their_own() -> None:
    from fedge.plugins.train.advise import CALIBRATION_SIZES, _default_calibration

    default = _default_calibration(2, CALIBRATION_SIZES, 5)
    assert default.name == f"collectives-{socket.gethostname()}-w2.json"
    others = {_default_calibration(2, "4KB,1MB", 5), _default_calibration(2, CALIBRATION_SIZES, 3)}
    assert len(others) == 2 and default not in others and all(p.parent == default.parent for p in others)
