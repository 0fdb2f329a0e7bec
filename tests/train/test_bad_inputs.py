"""A newcomer's mistakes with ``fedge train`` and ``fedge bench``: each is one line on stderr, a non-zero exit,
no traceback, and no run directory left behind (nothing starts). Table-driven: one row per bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.cli.app import main
from fedge.rundir import RUN_MARKER


def _run_of(kind: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.mkdir(parents=True)
        (path / RUN_MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        (path / "config.toml").write_text('strategy = "allreduce"\n')

    return make


def _unfinished_job_run(path: Path) -> None:
    """A node's unfinished run of the job on rendezvous 127.0.0.1:29431 with 20 steps (no summary.json)."""
    _run_of("train")(path)
    (path / "config.toml").write_text('strategy = "allreduce"\nsteps = 20\nnnodes = "2"\nrdzv_endpoint = "127.0.0.1:29431"\n')


def _file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a directory\n")


def _toml(text: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return make


# (id, args with {out} / {tmp} placeholders, setup of {tmp}/x, substring of the one line)
TRAIN_CASES = [
    ("unknown-strategy", ["--strategy", "no-such"], None, "unknown strategy 'no-such'; valid: "),
    ("unknown-model", ["--model", "no-such"], None, "unknown model 'no-such'; valid: "),
    ("unknown-dataset", ["--dataset", "no-such"], None, "unknown dataset 'no-such'; valid: "),
    ("steps-zero", ["--steps", "0"], None, "steps must be >= 1, got 0"),
    ("epochs-zero", ["--epochs", "0"], None, "epochs must be >= 1, got 0"),
    ("batch-zero", ["--batch-size", "0"], None, "batch_size must be >= 1, got 0"),
    ("batch-larger-than-data", ["--batch-size", "5000"], None, "larger than the training set of digits"),
    ("lr-nan-flag", ["--lr", "nan"], None, "lr must be a finite number"),
    ("lr-nan-option", ["-o", "lr=nan"], None, "lr must be a finite number"),
    ("lr-nan-toml", ["{tmp}/x"], _toml("[strategy_options]\nlr = nan\n"), "lr must be a finite number"),
    ("lr-negative", ["--lr", "-0.1"], None, "lr must be a positive number, got -0.1"),
    ("momentum-one", ["-o", "momentum=1"], None, "momentum must be in [0, 1), got 1.0"),
    ("timeout-inf", ["--timeout", "inf"], None, "timeout_s must be a finite number; got inf"),
    ("unknown-option", ["--strategy", "allreduce", "-o", "mode=async"], None, "unknown setting strategy_options (allreduce).mode"),
    ("option-without-value", ["-o", "bucket-mb"], None, "--option takes KEY=VALUE"),
    ("bad-backend", ["--backend", "mpi"], None, "backend must be one of auto, gloo, nccl"),
    ("nccl-without-gpu", ["--backend", "nccl"], None, "--backend nccl needs one CUDA GPU per process"),
    ("old-async-flag", ["--strategy", "parameter-server", "--nproc", "3", "--async"], None, "use -o mode=sync or -o mode=async"),
    ("old-sync-flag", ["--sync"], None, "use -o mode=sync or -o mode=async"),
    ("old-warmup-flag", ["--warmup-steps", "3"], None, "use -o warmup_steps=N"),
    ("old-lr-scaling-flag", ["--lr-scaling", "linear"], None, "use -o lr_scaling=linear"),
    ("ps-one-process", ["--strategy", "parameter-server", "--nproc", "1"], None, "parameter-server needs at least 2 processes"),
    ("npz-without-path", ["--dataset", "npz"], None, "needs dataset_options.path"),
    ("npz-path-missing", ["{tmp}/x"], _toml('dataset = "npz"\n[dataset_options]\npath = "/nonexistent/d.npz"\n'), "does not exist"),
    ("config-file-missing", ["{tmp}/missing.toml"], None, "missing.toml"),
    ("bf16-on-pipeline", ["--strategy", "pipeline", "--nproc", "2", "-o", "precision=bf16"], None, "not supported by the model-parallel strategies"),
    ("precision-fp8", ["-o", "precision=fp8"], None, "precision must be one of fp32, bf16"),
    ("freeze-garbage", ["-o", "freeze=last:2"], None, "freeze must be none, first:K[@STEP] or progressive:EVERY[@STEP]"),
    ("freeze-every-block", ["-o", "freeze=first:3"], None, "would freeze all 3 blocks of the model (1, 3, 5)"),
    ("freeze-on-pipeline", ["--strategy", "pipeline", "--nproc", "2", "-o", "freeze=first:1"], None, "strategy 'pipeline' does not support freeze"),
    ("recompute-garbage", ["-o", "recompute=3-1"], None, "recompute must be none, all, or block indices"),
    ("recompute-no-such-block", ["-o", "recompute=0,7"], None, "names block 7, but the model has 3 blocks"),
    ("powersgd-rank-zero", ["-o", "comm_hook=powersgd", "-o", "powersgd_rank=0"], None, "powersgd_rank must be >= 1"),
    ("fault-at-garbage", ["--fault-at", "x"], None, "fault_at must be RANK:STEP"),
    ("resume-empty-dir", ["--resume", "{tmp}"], None, "nothing to resume"),
    ("resume-fl-run", ["--resume", "{tmp}/x"], _run_of("fl"), "holds an fl run, not a train run"),
    ("resume-edge-run", ["--resume", "{tmp}/x"], _run_of("edge"), "holds an edge run, not a train run"),
    ("out-holds-a-train-run", ["--out", "{tmp}/x"], _run_of("train"), "already holds a train run"),
    ("out-holds-another-job-of-the-rendezvous", ["--out", "{tmp}/x", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29431", "--steps", "21"],
     _unfinished_job_run, "holds an unfinished train run of rendezvous 127.0.0.1:29431 (id 'fedge-train') started with other settings (steps is 20 there but 21 here)"),
    ("out-holds-an-fl-run", ["--out", "{tmp}/x"], _run_of("fl"), "already holds an fl run"),
    ("out-is-a-file", ["--out", "{tmp}/x"], _file, "is a file, not a directory"),
    ("resume-and-overwrite", ["--resume", "{tmp}/x", "--overwrite"], _run_of("train"), "no checkpoint yet"),
]


def _expand(args: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in args]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("args", "setup", "message"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input_is_one_line_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args, setup, message: str
) -> None:
    # Prepare: whatever the case needs at {tmp}/x; the default run root lies under tmp as well
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(tmp_path / "x")
    before = _snapshot(tmp_path)
    # Execute
    code = main(["train", *_expand(args, tmp_path)])
    # Assert: exit 1, exactly one line naming the problem, and the directory as it was (no run started)
    err = capsys.readouterr().err
    assert code == 1, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "runs").exists()


BENCH_CASES = [
    ("collectives-nproc-one", ["collectives", "--nproc", "1"], "--nproc must be >= 2"),
    ("collectives-size-not-float32", ["collectives", "--sizes", "6B"], "multiple of 4 bytes"),
    ("collectives-size-garbage", ["collectives", "--sizes", "lots"], "bad size 'lots'"),
    ("collectives-ring-chunk-zero", ["collectives", "--ring-chunk", "0"], "multiple of 4 bytes"),
    ("collectives-tree-chunk-garbage", ["collectives", "--tree-chunk", "1XB"], "bad size '1XB'"),
    ("collectives-out-holds-a-run", ["collectives", "--nproc", "2", "--out", "{tmp}/x"], "already holds a train run"),
    ("strategies-nproc-zero", ["strategies", "--nproc", "0"], "--nproc must be >= 2"),
    ("strategies-batch-negative", ["strategies", "--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
    ("strategies-batch-uneven", ["strategies", "--nproc", "3", "--batch-size", "64"], "must be divisible by --nproc 3"),
    ("strategies-hidden-garbage", ["strategies", "--hidden", "wide"], "--hidden takes comma-separated integers"),
    ("strategies-bucket-nan", ["strategies", "--bucket-mb", "nan"], "--bucket-mb must be > 0 MiB, got nan"),
    ("strategies-out-is-a-file", ["strategies", "--out", "{tmp}/file"], "is a file, not a directory"),
]


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in BENCH_CASES], ids=[c[0] for c in BENCH_CASES])
def test_bench_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args, message: str) -> None:
    _run_of("train")(tmp_path / "x")
    _file(tmp_path / "file")
    before = _snapshot(tmp_path)

    code = main(["bench", *_expand(args, tmp_path)])

    err = capsys.readouterr().err
    assert code == 1, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "warning"),
    [
        (["collectives", "--reps", "0"], "--reps 0 is below 1; using --reps 1"),
        (["collectives", "--max-iters", "1"], "--max-iters 1 is below 2; using --max-iters 2"),
        (["strategies", "--reps", "0"], "--reps 0 is below 1; using --reps 1"),
        (["strategies", "--iters", "0"], "--iters 0 is below 1; using --iters 1"),
    ],
)
def test_bench_warns_when_it_raises_a_count(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args, warning: str
) -> None:
    # Prepare: record the spec instead of launching
    from fedge.plugins.train import bench

    specs: list[dict] = []
    monkeypatch.setattr(bench, "run_bench", lambda what, n, spec, out=None, **kw: specs.append(spec) or [])
    # Execute
    code = main(["bench", *args, "--json"])
    # Assert: the run goes on with the raised count, and says so
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"fedge bench: warning: {warning}" in err
    flag = args[1].removeprefix("--").replace("-", "_")
    assert specs[0][flag] == int(warning.rsplit(" ", 1)[1])
