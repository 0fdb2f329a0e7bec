"""A third-party strategy (examples/custom_plugin's ``local-sgd``), installed into a private directory and
used only through the CLI, trains under torchrun and matches single-process SGD like the built-ins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 6


def _fedge(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())", *args],
        env=env, capture_output=True, text=True, timeout=420, check=False,
    )  # fmt: skip


@pytest.fixture
def plugin_env(example_plugin_site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(example_plugin_site), "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}


def test_its_options_show_in_train_help(plugin_env: dict[str, str]) -> None:
    proc = _fedge(["train", "--strategy", "local-sgd", "--help"], plugin_env)

    assert proc.returncode == 0, proc.stderr
    assert "Options of strategy local-sgd" in proc.stdout
    assert "period" in proc.stdout and "Average the parameters" in proc.stdout


@pytest.mark.multiproc
def test_it_trains_through_fedge_train_and_matches_single_process(
    tmp_path: Path, plugin_env: dict[str, str], write_run, reference_state
) -> None:
    # Prepare: the tiny parity settings as a config file
    settings = write_run(tmp_path / "settings", steps=STEPS) / "config.toml"
    run_dir = tmp_path / "run"
    # Execute: period 1 (its parity case), on 2 processes
    proc = _fedge(
        ["train", str(settings), "--strategy", "local-sgd", "-o", "period=1", "--nproc", "2", "--out", str(run_dir), "--json"],
        plugin_env,
    )
    # Assert: the same parameters and per-step losses as single-process SGD on the same global batches
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["strategy"] == "local-sgd"
    ref_state, ref_losses = reference_state(STEPS)
    state = torch.load(run_dir / "model.pt", weights_only=True)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
