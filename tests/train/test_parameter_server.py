"""Parameter server: the loss rank 0 logs is the server's view of all workers' pushes, not rank 0's own.

Both jobs run on 3 processes (workers: ranks 0 and 1, each on its half of every batch; server: rank 2) and
share their process start-ups: the async job and the first leg of the sync job run in one launch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc


def _rank0_own_first_loss(tiny: dict, num_workers: int) -> float:
    """Rank 0's loss on its rows of the first global batch, at the initial weights (the old logged value)."""
    import torch
    import torch.nn.functional as F

    from fedge.plugins.data import load_dataset
    from fedge.plugins.models import build_model
    from fedge.plugins.train.trainer import BatchOrder

    data = load_dataset(tiny["dataset"])
    model = build_model(
        tiny["model"], {"seed": tiny["seed"], **tiny["model_options"]},
        input_shape=data.input_shape, num_classes=data.num_classes,
    )  # fmt: skip
    idx = BatchOrder(len(data.x_train), tiny["batch_size"], tiny["seed"]).indices(0)
    rows = idx[: tiny["batch_size"] // num_workers]
    with torch.no_grad():
        return float(F.cross_entropy(model(torch.as_tensor(data.x_train)[rows]), torch.as_tensor(data.y_train)[rows]))


SYNC = {"strategy": "parameter-server", "strategy_options": {"mode": "sync"}, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, write_run, run_workers) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ps")
    # staleness = 0 holds each reply until both workers have pushed, so rank 0's first reply covers exactly
    # both step-0 pushes, made from the same initial weights.
    asyn = write_run(
        tmp / "async", strategy="parameter-server", strategy_options={"mode": "async", "staleness": 0}, steps=4
    )
    sync = write_run(tmp / "sync", steps=3, **SYNC)
    run_workers(3, [asyn, sync])
    write_run(sync, steps=5, **SYNC)  # continue the sync run from its step-3 checkpoint
    run_workers(3, [sync])
    return {"async": asyn, "sync": sync}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_async_logged_loss_is_the_mean_over_both_workers(runs, reference_state, tiny_settings) -> None:
    # Prepare: the two workers' step-0 losses average to the single-process loss of the first global batch;
    # rank 0's half alone (what async used to log) is told apart from it.
    _, ref_losses = reference_state(1)
    own = _rank0_own_first_loss(tiny_settings, num_workers=2)
    assert abs(own - ref_losses[0]) > 1e-3
    # Execute
    metrics = _metrics(runs["async"])
    # Assert
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"step", "loss", "samples_per_s"} <= set(m) for m in metrics)
    assert metrics[0]["loss"] == pytest.approx(ref_losses[0], rel=1e-5)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert json.loads((runs["async"] / "summary.json").read_text())["final_loss"] == metrics[-1]["loss"]


def test_sync_logged_loss_is_the_global_batch_loss_across_a_resume(runs, reference_state) -> None:
    # Execute
    _, ref_losses = reference_state(5)
    metrics = _metrics(runs["sync"])
    # Assert: every logged loss is the single-process loss of that step's global batch
    assert json.loads((runs["sync"] / "summary.json").read_text())["resumed_from_step"] == 3
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in metrics] == pytest.approx(ref_losses, rel=1e-5)
