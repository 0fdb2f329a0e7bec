"""``fedge train`` end to end through the real torchrun: a worker killed mid-run is restarted by torchrun
and resumes from the checkpoint; ``--resume`` continues a finished run; ``--profile`` traces load in the
profiler; and user mistakes end in one line and a non-zero exit before any process starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedge.cli.app import main

FAULT_STEPS, CKPT_EVERY, RESUME_STEPS = 12, 4, 14


def _fedge(args: list[str], env: dict[str, str], timeout_s: float = 420) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())", *args],
        env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
    )


def _assert_same(state: dict, ref: dict) -> None:
    for key, value in ref.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory, write_run) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A 2-process allreduce job whose rank 1 SIGKILLs itself before step 6 (checkpoint at 4), --max-restarts 1."""
    import os

    tmp = tmp_path_factory.mktemp("fault")
    config = write_run(tmp / "settings") / "config.toml"  # the tiny model and data settings
    run_dir = tmp / "run"
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    proc = _fedge(
        [
            "train", str(config), "--strategy", "allreduce", "--nproc", "2", "--steps", str(FAULT_STEPS),
            "--checkpoint-every", str(CKPT_EVERY), "--max-restarts", "1", "--fault-at", "1:6", "--profile",
            "--out", str(run_dir), "--json",
        ],
        env,
    )
    return run_dir, proc


@pytest.mark.multiproc
def test_killed_worker_restarts_and_resumes_from_checkpoint(fault_run, reference_state) -> None:
    run_dir, proc = fault_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["restarts"] == 1 and summary["resumed_from_step"] == CKPT_EVERY
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, FAULT_STEPS + 1))
    ref_state, _ = reference_state(FAULT_STEPS)
    _assert_same(torch.load(run_dir / "model.pt", weights_only=True), ref_state)  # = an uninterrupted run
    assert json.loads((run_dir / "model.json").read_text())["dataset"] == "digits"


@pytest.mark.multiproc
def test_profile_writes_one_trace_per_rank_that_the_profiler_reads(fault_run, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, proc = fault_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = sorted(p.name.split(".")[0] for p in (run_dir / "traces").glob("*.pt.trace.json"))
    assert traces == ["rank0", "rank1"]
    capsys.readouterr()
    code = main(["profile", "report", str(run_dir / "traces"), "--json"])
    out = capsys.readouterr()
    if "No such command 'profile'" in out.err:
        pytest.skip("fedge profile is not installed")
    assert code == 0, out.err
    assert [r["rank"] for r in json.loads(out.out)["ranks"]] == [0, 1]


@pytest.mark.multiproc
def test_resume_continues_a_finished_run(fault_run, reference_state) -> None:
    import os

    run_dir, first = fault_run
    assert first.returncode == 0, first.stderr[-3000:]
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")

    proc = _fedge(["train", "--resume", str(run_dir), "--steps", str(RESUME_STEPS), "--json"], env)

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["resumed_from_step"] == FAULT_STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, RESUME_STEPS + 1))
    ref_state, _ = reference_state(RESUME_STEPS)
    _assert_same(torch.load(run_dir / "model.pt", weights_only=True), ref_state)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "no-such"], "unknown strategy 'no-such'; valid: "),
        (["--strategy", "parameter-server", "--nproc", "1"], "parameter-server needs at least 2 processes"),
        (["--strategy", "ring-allreduce", "--nproc", "4", "--batch-size", "10"], "does not split evenly over 4"),
        (["--strategy", "ring-allreduce", "-o", "chunk_bytes=big"], "chunk_bytes must be an integer"),
        (["--strategy", "allreduce", "-o", "bucket-mb"], "--option takes KEY=VALUE"),
        (["--nnodes", "2"], "needs --rdzv-endpoint"),
        (["--nnodes", "3:1", "--rdzv-endpoint", "h:1"], "MIN <= MAX"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:70000"], "port must be 1-65535, got 'h:70000'"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-id", "my job"], "rdzv_id takes letters"),
        (["--nnodes", "1:2", "--rdzv-endpoint", "h:1", "--rdzv-last-call", "0"], "timeouts must be > 0 seconds"),
    ],
)
def test_user_mistakes_are_one_line_before_any_process_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["train", *args, "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 1
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "logs").exists()
    assert not (tmp_path / "run").exists()  # no run directory either: nothing to clean up after a typo


def test_unreachable_rendezvous_endpoint_fails_in_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, so nothing answers.
    args = ["train", "--nnodes", "2", "--rdzv-endpoint", "192.0.2.1:29400", "--rdzv-timeout", "2"]

    code = main([*args, "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 3
    assert "cannot reach the rendezvous endpoint 192.0.2.1:29400 within 2s" in err


def test_resume_needs_a_checkpoint(tmp_path: Path, write_run, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run")

    code = main(["train", "--resume", str(run_dir)])

    assert code == 1
    assert "has no checkpoint yet" in capsys.readouterr().err


@pytest.mark.multiproc
def test_bench_json_contract_and_an_out_holding_a_run_is_refused_and_replaced_whole_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first run also checks --json's contract (one start of the processes serves both).
    out = tmp_path / "bench"
    args = ["bench", "collectives", "--nproc", "2", "--sizes", "4KB,64KB", "--reps", "1", "--max-iters", "2", "--json",
            "--out", str(out)]
    assert main(args) == 0
    first = (out / "results.json").read_bytes()
    rows = json.loads(capsys.readouterr().out)
    assert {(r["impl"], r["bytes"]) for r in rows} == {
        (impl, size) for impl in ("native", "ring", "tree", "parameter-server") for size in (4096, 65536)
    }
    for r in rows:
        assert set(r) == {"impl", "bytes", "algbw_gbps", "busbw_gbps", "ratio_to_native"}
        assert r["algbw_gbps"] > 0 and r["busbw_gbps"] == pytest.approx(r["algbw_gbps"])  # 2(W-1)/W = 1 at W=2
        if r["impl"] == "native":
            assert r["ratio_to_native"] == 1.0
    assert main(args) == 1
    assert "already holds a bench run; choose a new directory or pass --overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == first
    (out / "stale.txt").write_text("from the first run")
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "results.json").is_file()


def test_bench_strategies_times_the_sync_parameter_server_against_ddp(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "strategies", "--nproc", "2", "--hidden", "16", "--reps", "1", "--iters", "2", "--json"])

    out = capsys.readouterr()
    assert code == 0, out.err
    rows = {r["impl"]: r for r in json.loads(out.out)}
    # Every installed strategy that trains an MLP data-parallel is timed, with nothing listed by hand.
    assert set(rows) == {"ddp", "allreduce", "ring-allreduce", "tree-allreduce", "parameter-server", "fsdp"}
    assert rows["ddp"]["throughput_vs_ddp"] == 1.0
    assert rows["parameter-server"]["throughput_vs_ddp"] > 0


@pytest.mark.parametrize(
    ("nproc", "batch", "timed", "note"),
    [
        (3, 48, {}, ""),  # its defaults: mode sync, one server
        (4, 64, None, ("parameter-server left out: batch size 64 does not split evenly over 3 workers "
                       "(4 processes - 1 server); use a multiple of 3")),
    ],
)  # fmt: skip
def test_bench_strategies_leaves_out_a_parameter_server_the_batch_does_not_fit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], nproc: int, batch: int, timed, note: str
) -> None:
    # Prepare: record the spec instead of launching
    from fedge.plugins.train import bench

    specs: list[dict] = []
    monkeypatch.setattr(bench, "run_bench", lambda what, n, spec, out=None, **kw: specs.append(spec) or [])
    # Execute
    code = main(["bench", "strategies", "--nproc", str(nproc), "--batch-size", str(batch), "--json"])
    # Assert: every other strategy is still timed on the same batch; a left-out server gets one note line
    err = capsys.readouterr().err
    assert code == 0
    assert specs[0]["strategies"].get("parameter-server") == timed
    assert {"allreduce", "ring-allreduce", "tree-allreduce"} <= set(specs[0]["strategies"])
    if note:
        assert err.splitlines() == [f"fedge bench: {note}"]
    else:
        assert err == ""


def test_bench_strategies_times_defaults_unless_asked_for_the_parity_settings() -> None:
    from fedge.plugins.train.bench import strategies_spec

    def spec(parity: bool) -> dict:
        return strategies_spec(2, model="mlp", model_options={}, batch_size=64, reps=1, iters=1, bucket_mb=25.0,
                               parity=parity)["strategies"]  # fmt: skip

    defaults, parity = spec(False), spec(True)

    assert defaults["ring-allreduce"] == {} and defaults["tree-allreduce"] == {}  # 4 MiB and 1 MiB chunks
    assert parity["ring-allreduce"] == {"chunk_bytes": 256} and parity["tree-allreduce"] == {"chunk_bytes": 512}
    assert defaults["allreduce"] == parity["allreduce"] == {"bucket_mb": 25.0}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--nproc", "1"], "--nproc must be >= 2 (one process has nothing to exchange), got 1"),
        (["--nproc", "0"], "--nproc must be >= 2 (one process has nothing to exchange), got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--nproc", "3", "--batch-size", "64"], "--batch-size 64 must be divisible by --nproc 3"),
        (["--hidden", "a,b"], "--hidden takes comma-separated integers, got 'a,b'"),
        (["--bucket-mb", "0"], "--bucket-mb must be > 0 MiB, got 0"),
    ],
)
def test_bench_strategies_bad_input_is_exactly_one_line(capsys: pytest.CaptureFixture[str], args, line: str) -> None:
    code = main(["bench", "strategies", *args])

    assert code == 1
    assert capsys.readouterr().err.splitlines() == [f"fedge: error: {line}"]
