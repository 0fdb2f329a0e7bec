"""World-size independent checkpoints (torch.distributed.checkpoint): a job checkpointed at one world size
resumes at another, 2 -> 4 -> 2 processes, and ends with the parameters of an uninterrupted single-process
run at the same global batch (fp32, rtol 1e-5) - the parameter server's shards and momentum, and fsdp's
DTensor shards, included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multiproc

LEG_STEPS = 3  # each leg trains 3 steps and checkpoints after them


def _assert_same(state: dict, ref: dict) -> None:
    assert state.keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


# parameter-server: one server, 2 -> 3 -> 2 workers; fsdp: DTensor shards resharded by DCP; pipeline:
# 2 -> 4 -> 2 stages of the mlp's 6 layers; megatron: tp 2 x dp 1 -> dp 2 -> tp 1 x dp 2 (-o tp=1 on the last leg).
RESIZES = {"allreduce": (2, 4, 2), "parameter-server": (3, 4, 3), "fsdp": (2, 4, 2), "pipeline": (2, 4, 2), "megatron": (2, 4, 2)}
GPT = {"model": "tiny-gpt", "model_options": {"d_model": 32, "num_heads": 4, "num_layers": 2}}
SETTINGS = {"megatron": lambda leg: {**GPT, "strategy_options": {"tp": 2 if leg < 2 else 1}}}


@pytest.fixture(scope="module")
def resized(tmp_path_factory: pytest.TempPathFactory, write_run, run_workers) -> dict[str, tuple[Path, list[dict]]]:
    """Every strategy's run, leg by leg; the legs at one world size share one start of the processes (start-up
    dominates). Per strategy: its run directory and ``latest.json`` as it was after each leg."""
    tmp = tmp_path_factory.mktemp("resize")
    metas: dict[str, list[dict]] = {s: [] for s in RESIZES}
    for leg in range(3):
        by_world: dict[int, list[str]] = {}
        for strategy, worlds in RESIZES.items():
            by_world.setdefault(worlds[leg], []).append(strategy)
        for world, names in by_world.items():
            for strategy in names:
                extra = SETTINGS[strategy](leg) if strategy in SETTINGS else {}
                write_run(tmp / strategy, strategy=strategy, steps=LEG_STEPS * (leg + 1), checkpoint_every=LEG_STEPS, **extra)
            run_workers(world, [tmp / s for s in names])
            for strategy in names:
                metas[strategy].append(json.loads((tmp / strategy / "checkpoints" / "latest.json").read_text()))
    return {s: (tmp / s, metas[s]) for s in RESIZES}


@pytest.mark.parametrize("strategy", sorted(RESIZES))
def test_resized_resume_matches_an_uninterrupted_run(resized, reference_state, strategy: str) -> None:
    run_dir, metas = resized[strategy]
    worlds = RESIZES[strategy]
    for leg, (world, meta) in enumerate(zip(worlds, metas, strict=True), start=1):
        assert (meta["format"], meta["world_size"], meta["step"]) == ("dcp", world, LEG_STEPS * leg)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == LEG_STEPS * (len(worlds) - 1)
    model = GPT if strategy == "megatron" else {}
    ref_state, ref_losses = reference_state(LEG_STEPS * len(worlds), **model)
    _assert_same(torch.load(run_dir / "model.pt", weights_only=True), ref_state)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_fedge_train_resumes_a_parameter_server_at_another_world_size(tmp_path: Path, write_run, reference_state) -> None:
    # The same through the CLI and torchrun: a job migrated from 3 processes to 4 (2 workers -> 3).
    settings = write_run(tmp_path / "settings") / "config.toml"
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")

    def fedge(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())", *args],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    first = fedge("train", str(settings), "--strategy", "parameter-server", "--nproc", "3", "--steps", "4",
                  "--checkpoint-every", "2", "--out", str(run_dir))  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    second = fedge("train", "--resume", str(run_dir), "--nproc", "4", "--steps", "8", "--json")

    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert (summary["world_size"], summary["resumed_from_step"]) == (4, 4)
    _assert_same(torch.load(run_dir / "model.pt", weights_only=True), reference_state(8)[0])
