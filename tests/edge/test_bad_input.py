"""A newcomer's mistakes with `fedge edge export | fit | inspect | boards`, as a table: each is one line on stderr,
exit 1, found before any conversion, and leaves no run directory behind; a previous run is never written into."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.cli.app import main

BOARD = "arduino-nano-33-ble-sense"

# {tmp} is the test's directory (see _inputs for what it holds), {run} a trained fedge run directory.
EXPORT = [
    (["{tmp}/nowhere"], "no model at"),
    (["{tmp}/corrupt"], "cannot load weights"),
    (["{tmp}/random"], "expected a torch state_dict of tensors"),
    (["{tmp}/nojson/model.pt"], "no model.json beside"),
    (["{tmp}/badjson"], "is not a fedge model.json"),
    (["{tmp}/notes.txt"], "is not a model fedge can export"),
    (["{run}", "--quantize", "int4"], "quantize must be one of"),
    (["{run}", "--target", "esp8266"], "unknown board 'esp8266'"),
    (["{run}", "--quantize", "float16", "--target", "esp32"], "cannot run float16"),
    (["{run}", "--exporter", "onnx"], "unknown exporter 'onnx'"),
    (["{run}", "-o", "symbol"], "--option takes KEY=VALUE"),
    (["{run}", "-o", "bogus=1"], "unknown setting exporter.c-array.bogus"),
    (["{run}", "-o", "calibration_samples=0"], "calibration_samples must be >= 1, got 0"),
    (["{run}", "-o", "calibration_samples=nan"], "calibration_samples must be an integer"),
    (["{run}", "-o", "symbol=1model"], "C symbol must be a C identifier"),
    (["{run}", "--exporter", "tflite", "-o", "symbol=g"], "unknown setting exporter.tflite.symbol"),
    (["{run}", "--config", "{tmp}/missing.toml"], "config file"),
    (["{run}", "--config", "{tmp}/unknown.toml"], "unknown setting edge export.quantise"),
    (["{run}", "--boards", "{tmp}/boards_negative.toml", "--target", "x"], "flash_kb and ram_kb must be >= 0"),
    (["{run}", "--dataset", "mnist"], "model.json names dataset 'digits'"),
    (["{tmp}/nodataset", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["{run}", "--out", "{tmp}/notes.txt"], "is a file"),
    (["{run}", "--out", "{tmp}/previous"], "already holds a run; choose a new directory"),
    (["{run}", "--out", "{tmp}/fl-run"], "already holds an fl run"),
]
FIT = [
    (["{tmp}/nowhere", "-t", BOARD], "no model at"),
    (["{tmp}/corrupt", "-t", BOARD], "cannot load weights"),
    (["{run}"], "edge fit.target is required"),
    (["{run}", "-t", "esp8266"], "unknown board 'esp8266'"),
    (["{tmp}/model.keras", "-t", BOARD], "fedge edge fit rebuilds the model from its plugin"),
    (["{run}", "-t", BOARD, "--ranks", "1.5"], "ranks must be fractions between 0 and 1"),
    (["{run}", "-t", BOARD, "--widths", "0"], "widths must be fractions between 0 and 1"),
    (["{run}", "-t", BOARD, "--widths", "half"], "edge fit.widths"),
    (["{run}", "-t", BOARD, "--ranks", "", "--widths", ""], "there is nothing to search"),
    (["{run}", "-t", BOARD, "--epochs", "0"], "epochs must be >= 1"),
    (["{run}", "-t", BOARD, "--temperature", "0"], "temperature must be > 0"),
    (["{run}", "-t", BOARD, "--alpha", "2"], "alpha must be between 0 and 1"),
    (["{run}", "-t", BOARD, "--symbol", "1model"], "C symbol must be a C identifier"),
    (["{run}", "-t", BOARD, "--dataset", "mnist"], "model.json names dataset 'digits'"),
    (["{run}", "-t", BOARD, "--config", "{tmp}/unknown.toml"], "unknown setting edge fit.quantise"),
    (["{run}", "-t", "x", "--boards", "{tmp}/boards_negative.toml"], "flash_kb and ram_kb must be >= 0"),
    (["{run}", "-t", BOARD, "--out", "{tmp}/notes.txt"], "is a file"),
    (["{run}", "-t", BOARD, "--out", "{tmp}/previous"], "already holds a run; choose a new directory"),
]
INSPECT = [
    (["{tmp}/missing.tflite"], "no TFLite model at"),
    (["{tmp}/corrupt/model.pt"], "not a TFLite model"),
    (["{tmp}"], "no TFLite model at"),
    (["{tmp}/empty.tflite"], "not a TFLite model"),
    (["{tmp}/truncated.tflite"], "cannot read the TFLite model"),
    (["{tmp}/random/model.pt"], "not a TFLite model"),
]
BOARDS = [
    (["--boards", "{tmp}/missing.toml"], "not found"),
    (["--boards", "{tmp}/notes.txt"], "is not valid TOML"),
    (["--boards", "{tmp}/boards_empty.toml"], "has no [boards.NAME] tables"),
    (["--boards", "{tmp}/boards_negative.toml"], "flash_kb and ram_kb must be >= 0"),
    (["--boards", "{tmp}/boards_text.toml"], "flash_kb must be an integer"),
    (["--boards", "{tmp}/boards_scalar.toml"], "must be a table with flash_kb, ram_kb, notes"),
    (["--boards", "{tmp}/boards_unknown.toml"], "unknown setting"),
]
CASES = (
    [pytest.param(["edge", "export", *a], e, id=f"export:{e[:40]}") for a, e in EXPORT]
    + [pytest.param(["edge", "fit", *a], e, id=f"fit:{e[:40]}") for a, e in FIT]
    + [pytest.param(["edge", "inspect", *a], e, id=f"inspect:{e[:40]}") for a, e in INSPECT]
    + [pytest.param(["edge", "boards", *a], e, id=f"boards:{e[:40]}") for a, e in BOARDS]
)


def _inputs(tmp: Path, trained_run: Path, tflite: bytes) -> None:
    """The files the table points at."""
    for name, weights in (("corrupt", b"not a checkpoint"), ("random", os.urandom(4096)), ("badjson", None)):
        (tmp / name).mkdir()
        shutil.copy(trained_run / "model.json", tmp / name / "model.json")
        (tmp / name / "model.pt").write_bytes(weights or (trained_run / "model.pt").read_bytes())
    (tmp / "badjson" / "model.json").write_text('{"model": ')
    shutil.copytree(tmp / "corrupt", tmp / "nodataset")
    shutil.copy(trained_run / "model.pt", tmp / "nodataset" / "model.pt")
    spec = json.loads((trained_run / "model.json").read_text())
    (tmp / "nodataset" / "model.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "dataset"}))
    (tmp / "nojson").mkdir()
    shutil.copy(trained_run / "model.pt", tmp / "nojson" / "model.pt")
    (tmp / "notes.txt").write_text("[not toml\n")
    (tmp / "model.keras").write_bytes(b"not read: fit refuses a Keras model by its name")
    (tmp / "unknown.toml").write_text('quantise = "int8"\n')
    (tmp / "previous").mkdir()
    (tmp / "previous" / "edge-report.json").write_text("{}\n")
    (tmp / "fl-run").mkdir()
    (tmp / "fl-run" / ".fedge-run").write_text('{"kind": "fl"}\n')
    (tmp / "empty.tflite").write_bytes(b"")
    (tmp / "truncated.tflite").write_bytes(tflite[:200])
    (tmp / "boards_empty.toml").write_text("[other]\nx = 1\n")
    (tmp / "boards_negative.toml").write_text("[boards.x]\nflash_kb = -1\n")
    (tmp / "boards_text.toml").write_text('[boards.x]\nflash_kb = "lots"\n')
    (tmp / "boards_scalar.toml").write_text("[boards]\nx = 3\n")
    (tmp / "boards_unknown.toml").write_text("[boards.x]\nflash_kb = 8\nsram_kb = 2\n")


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_bad_input_is_one_clear_line_before_any_work(
    argv: list[str],
    expected: str,
    trained_run: Path,
    export_run,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedge.edge import convert

    # Prepare: any conversion would be a failure of this test
    _, int8_dir = export_run("--quantize", "int8", "--target", BOARD)
    _inputs(tmp_path, trained_run, (int8_dir / "model.tflite").read_bytes())
    monkeypatch.setattr(convert.ConversionWorker, "start", lambda self: None)
    monkeypatch.setattr(convert.ConversionWorker, "run", lambda self, job: pytest.fail("a conversion was started"))
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)

    # Execute
    code = main([a.format(tmp=tmp_path, run=trained_run) for a in argv])

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], err
    assert "weights_only" not in err[0]  # torch's unsafe advice is never passed on
    assert _tree(tmp_path) == before and not (tmp_path / "runs").exists()


def test_a_second_export_into_the_same_out_is_refused_and_the_first_is_untouched(
    export_run, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    code, run_dir = export_run("--quantize", "int8", "--target", BOARD)
    before = _tree(run_dir)

    # Execute
    again = main(["edge", "export", str(trained_run), "--quantize", "none", "--out", str(run_dir)])

    # Assert
    err = capsys.readouterr().err
    assert code == 0 and again == 1
    assert "already holds an edge run" in err
    assert "--overwrite" in err
    assert _tree(run_dir) == before


def test_overwrite_replaces_a_previous_run_whole(export_run, trained_run: Path, tmp_path: Path, lend_worker) -> None:

    # Prepare: a copy of a previous export, with a file of its own
    _, run_dir = export_run("--quantize", "none", "--target", "generic")
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    (out / "stale.txt").write_text("from the old run\n")

    # Execute
    with lend_worker():
        code = main(
            [
                "edge",
                "export",
                str(trained_run),
                "--exporter",
                "tflite",
                "--quantize",
                "none",
                "--out",
                str(out),
                "--overwrite",
                "--json",
            ]
        )

    # Assert: nothing of the old run is left; exactly one export's metrics
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".fedge-run",
        "config.toml",
        "edge-report.json",
        "metrics.jsonl",
        "model.tflite",
    ]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "edge-report.json").read_text())["exporter"] == "tflite"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A read-only and a full filesystem (tmpfs mounts; root only)."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir(), full.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64m", "tmpfs", str(ro)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True, capture_output=True)
        (full / "filler").write_bytes(b"\0" * 900 * 1024)
        yield {"ro": ro, "full": full}
    finally:
        subprocess.run(["umount", str(ro)], check=False, capture_output=True)
        subprocess.run(["umount", str(full)], check=False, capture_output=True)


@pytest.mark.parametrize(
    ("where", "expected"), [("ro", "Read-only file system"), ("ro/sub", "Read-only file system"), ("full", "MiB free")]
)
def test_a_read_only_or_full_out_is_one_line_before_the_conversion(
    where: str,
    expected: str,
    mounted: dict[str, Path],
    trained_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedge.edge import convert

    monkeypatch.setattr(convert.ConversionWorker, "start", lambda self: None)
    monkeypatch.setattr(convert.ConversionWorker, "run", lambda self, job: pytest.fail("a conversion was started"))
    base, _, sub = where.partition("/")
    out = mounted[base] / sub if sub else mounted[base]

    code = main(["edge", "export", str(trained_run), "--out", str(out)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and expected in err[0], err


def test_ctrl_c_is_one_line_saying_nothing_was_written(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedge.edge import export_workflow

    def interrupt(path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export_workflow, "load_source", interrupt)

    code = main(["edge", "export", str(trained_run), "--out", str(tmp_path / "out")])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and "interrupted" in err[0] and "no run was written" in err[0]
    assert not (tmp_path / "out").exists()
