"""End to end through the worker loop and ``fedge train`` (real torchrun, gloo): model.pt, resume, traces, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedge.cli.app import main

MODEL_OPTIONS = {"d_model": 32, "num_heads": 4, "num_layers": 2}
BATCH, SEED = 16, 0


def _config(tmp_path: Path, num_layers: int = 2) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(
        f'model = "tiny-gpt"\ndataset = "digits"\nbatch_size = {BATCH}\nseed = {SEED}\n'
        f"[model_options]\nd_model = 32\nnum_heads = 4\nnum_layers = {num_layers}\n"
    )
    return path


def _fedge(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the CLI in this process (torchrun still starts real worker processes); (exit code, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _reference(steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process training on the worker's global batches (same data, order, seed and optimizer)."""
    import torch.nn.functional as F

    from fedge.plugins.data import load_dataset
    from fedge.plugins.models import build_model
    from fedge.plugins.train.trainer import BatchOrder

    data = load_dataset("digits", {})
    x_all, y_all = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    order = BatchOrder(len(x_all), BATCH, SEED)
    model = build_model(
        "tiny-gpt", {"seed": SEED, **MODEL_OPTIONS}, input_shape=data.input_shape, num_classes=data.num_classes
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        idx = order.indices(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, model.state_dict()


def _assert_run_matches(run: Path, steps: int) -> None:
    ref_losses, ref_state = _reference(steps)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    torch.testing.assert_close(
        torch.tensor([m["loss"] for m in metrics]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6
    )
    state = torch.load(run / "model.pt", weights_only=True)
    assert set(state) == set(ref_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.multiproc
def test_pipeline_checkpoint_resume_matches_single_process(tmp_path, run_workers):
    # Prepare: the worker loop torchrun would start, on 2 forked processes
    run = tmp_path / "run"
    settings = {
        "strategy": "pipeline", "model": "tiny-gpt", "model_options": MODEL_OPTIONS, "dataset": "digits",
        "batch_size": BATCH, "seed": SEED, "nproc": 2, "checkpoint_every": 1,
        "strategy_options": {"stages": 2, "microbatches": 4, "schedule": "gpipe"},
    }  # fmt: skip
    # Execute: 2 steps with a checkpoint after each, then the same run resumed to 3 steps
    run_workers(2, run, steps=2, **settings)
    saved = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    run_workers(2, run, steps=3, **settings)
    # Assert
    assert saved in (1, 2)
    assert saved == 2  # the checkpoint of the last step, so the resume has exactly one step to redo
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == saved
    _assert_run_matches(run, 3)


@pytest.mark.multiproc
def test_megatron_with_profile_matches_single_process(tmp_path, capsys):
    cfg, run = _config(tmp_path), tmp_path / "run"
    code, err = _fedge(capsys, "train", str(cfg), "--strategy", "megatron", "--nproc", "2", "-o", "tp=2",
                  "--steps", "2", "--checkpoint-every", "1", "--profile", "--out", str(run))  # fmt: skip
    assert code == 0, err
    _assert_run_matches(run, 2)
    traces = sorted(p.name for p in (run / "traces").iterdir())
    assert any("rank0" in t for t in traces) and any("rank1" in t for t in traces)
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] >= 1


@pytest.mark.parametrize(
    ("args", "num_layers", "line"),
    [
        (["--strategy", "megatron", "--nproc", "4", "-o", "tp=2", "-o", "dp=3"], 2,
         ("parallel layout dp=3 x tp=2 x pp=1 = 6 does not equal the world size 4; "
          "choose dp, tp and pp whose product is 4")),
        (["--strategy", "megatron", "--nproc", "4", "-o", "tp=3"], 2,
         "tp=3 x pp=1 = 3 does not divide the world size 4; choose tp and pp whose product divides 4"),
        (["--strategy", "pipeline", "--nproc", "4", "-o", "stages=3"], 2,
         ("stages=3 does not divide the 4 processes (--nproc x nodes); "
          "use a stage count dividing 4, or a multiple of 3 processes")),
        (["--strategy", "pipeline", "--nproc", "2", "-o", "stages=4"], 2,
         ("stages=4 needs at least 4 processes (one per stage), got 2 processes (--nproc x nodes); "
          "raise --nproc to a multiple of 4 or use fewer stages")),
        (["--strategy", "pipeline", "--nproc", "4", "-o", "stages=2", "-o", "dp=1"], 2,
         ("stages=2 x dp=1 = 2 does not equal the 4 processes (--nproc x nodes); "
          "choose stages and dp whose product is 4, or run 2 processes")),
    ],
    ids=["megatron-layout", "megatron-tp", "pipeline-stages", "pipeline-too-few-processes", "pipeline-stages-x-dp"],
)  # fmt: skip
def test_bad_layout_before_launch_is_exactly_one_line_and_exit_1(tmp_path, capsys, args, num_layers, line):
    # Execute: refused by check_world_size before torchrun starts
    code, err = _fedge(
        capsys, "train", str(_config(tmp_path, num_layers)), *args, "--steps", "1", "--out", str(tmp_path / "run")
    )
    # Assert: the whole of stderr is the one error line
    assert code == 1
    assert err.splitlines() == [f"fedge: error: {line}"], err
    assert not (tmp_path / "run").exists()


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("args", "num_layers", "message"),
    [
        (["--strategy", "pipeline", "--nproc", "2", "-o", "microbatches=3"], 2, "microbatches=3 does not divide"),
        (["--strategy", "pipeline", "--nproc", "4"], 1,
         ("4 processes (--nproc x nodes) / dp=1 make 4 stages (one per process), more than the model's 3 top-level "
          "layers; lower --nproc, raise dp, or set stages (at most 3)")),
        (["--strategy", "pipeline", "--nproc", "4", "-o", "stages=4"], 1,
         "stages=4 is more than the model's 3 top-level layers; use at most 3 stages"),
    ],
    ids=["microbatches", "derived-stages-over-layers", "stages-over-layers"],
)  # fmt: skip
def test_bad_layout_is_one_line_and_exit_1(tmp_path, capsys, args, num_layers, message):
    code, err = _fedge(
        capsys, "train", str(_config(tmp_path, num_layers)), *args, "--steps", "1", "--out", str(tmp_path / "run")
    )
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("fedge: error")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and "tp=" not in err
