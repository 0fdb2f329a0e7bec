"""A third-party aggregator (examples/custom_plugin's ``clipped-fedavg``, a FedAvg subclass with its own
server state) installed into a private directory and used through the CLI, resume included."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

FEDGE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "fedge"


def _state(run: Path, server_round: int) -> dict[str, float]:
    with np.load(run / "checkpoints" / f"round-{server_round:04d}.strategy.npz") as data:
        return {k: float(data[k]) for k in data.files}


def test_third_party_aggregator_runs_and_resumes_with_its_state(example_plugin_site: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(example_plugin_site)}  # reaches the SuperNodes and the ServerApp too
    out = tmp_path / "run"
    common = ["--local-epochs", "1", "--model", "mlp", "--partition", "iid", "--json"]

    # Execute: one round with a clip every update exceeds, then a resume that goes one round further.
    first = subprocess.run(
        [str(FEDGE), "fl", "run", "--aggregator", "clipped-fedavg", "-O", "clipping_norm=0.01", "-O", "clip_lr=0.5",
         "--clients", "2", "--rounds", "1", "--out", str(out), *common],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    config = out / "config.toml"
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 2"))
    resumed = subprocess.run(
        [str(FEDGE), "fl", "run", "--resume", str(out), "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    # Assert: the aggregator's own state (declared, not listed anywhere in fedge) continued across the resume.
    assert resumed.returncode == 0, resumed.stderr
    assert [m["round"] for m in json.loads(resumed.stdout)["metrics"]] == [1, 2]
    one, two = _state(out, 1), _state(out, 2)
    assert one["num_clipped"] == 2 and two["num_clipped"] == 4  # 2 after a restart from zero
    assert one["clipping_norm"] > 0.01 and two["clipping_norm"] > one["clipping_norm"]
