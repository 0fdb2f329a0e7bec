"""``fedge profile report``: JSON contract, HTML and run directory outputs, user errors."""

from __future__ import annotations

import json

from fedge.cli.app import main

CONTRACT = {"rank", "span_us", "idle_us", "compute_us", "non_compute_us", "comm_us", "exposed_comm_us", "overlap_pct"}


def _job(tmp_path, builder):
    for rank in (0, 1):
        b = builder(rank=rank).step(1, 0, 2000).step(2, 2000, 2000)
        b.kernel("gemm", 100, 400).kernel("ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)", 300 + 100 * rank, 500 - 100 * rank,
                                          stream=20, **{"Collective name": "allreduce", "In msg nelems": 1024, "dtype": "Float",
                                                        "Group size": 2})
        b.write(tmp_path / f"rank{rank}_trace.json.gz")
    return tmp_path


def test_json_follows_the_contract(tmp_path, builder, capsys):
    code = main(["profile", "report", str(_job(tmp_path, builder)), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["mode"] == "fedge" and report["errors"] == []
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert all(CONTRACT <= set(r) for r in report["ranks"])
    for key in ("collectives", "stragglers", "recommendations", "errors", "mode"):
        assert key in report
    assert report["collectives"][0]["collective"] == "all_reduce" and report["collectives"][0]["total_bytes"] == 4096


def test_terminal_html_and_out_dir(tmp_path, builder, capsys):
    traces = _job(tmp_path / "traces", builder) if (tmp_path / "traces").mkdir() is None else None
    html = tmp_path / "report.html"
    code = main(["profile", "report", str(traces), "--html", str(html), "--mode", "hta", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "Time per rank" in out and "Recommendations" in out
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert json.loads((tmp_path / "run" / "report.json").read_text())["mode"] == "hta"
    assert 'mode = "hta"' in (tmp_path / "run" / "config.toml").read_text()


def test_bad_mode_and_bad_path_are_one_line_errors(tmp_path, capsys):
    assert main(["profile", "report", str(tmp_path), "--mode", "tensorboard"]) == 1
    assert "unknown --mode 'tensorboard'; valid: fedge, hta" in capsys.readouterr().err
    assert main(["profile", "report", str(tmp_path / "missing")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "warning: command" not in line]
    assert len(err) == 1 and "no such file or directory" in err[0]


def test_run_directory_of_fedge_train_is_accepted(tmp_path, builder, capsys):
    (tmp_path / "traces").mkdir()
    _job(tmp_path / "traces", builder)
    (tmp_path / "config.toml").write_text('strategy = "allreduce"\n')
    (tmp_path / "model.json").write_text('{"model": "mlp"}')
    assert main(["profile", "report", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ranks"]) == 2


def test_unwritable_html_or_out_is_a_one_line_error(tmp_path, builder, capsys):
    # Prepare: a directory where --html wants a file, and a regular file where --out wants a directory
    traces = tmp_path / "traces"
    traces.mkdir()
    _job(traces, builder)
    (tmp_path / "taken").write_text("x")
    for option, target in (("--html", tmp_path), ("--out", tmp_path / "taken" / "run")):
        # Execute
        code = main(["profile", "report", str(traces), option, str(target)])
        # Assert
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "warning: command" not in line]
        assert code == 1
        assert len(err) == 1 and f"{option} {target}: cannot write" in err[0] and "writable path" in err[0]
