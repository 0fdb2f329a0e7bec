"""Differential privacy on Flower's Simulation Engine: the same DP wrappers, accountant and budget stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.plugins.fl import FlConfig, run
from fedge.plugins.fl.privacy import PrivacyConfig, PrivacyLedger

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TINY = {"model_options": {"channels": [4], "hidden": 16}, "local_epochs": 1, "batch_size": 32, "partition": "iid"}


def test_central_dp_in_simulation_reports_epsilon_each_round_and_stops_at_the_target(tmp_path: Path) -> None:
    # Prepare: 3 virtual clients, noise multiplier 3; a budget that holds 2 of the 3 rounds asked for.
    p = PrivacyConfig(dp="central", noise_multiplier=3.0, clip=0.5, target_epsilon=2.5)
    ledger = PrivacyLedger(p, population_size=3)
    rounds = ledger.rounds_within_budget(3)
    assert 1 <= rounds < 3
    # A round nobody answers in time releases nothing and spends nothing; on a loaded machine that would add a
    # round, so the deadline is far off.
    cfg = FlConfig(clients=3, rounds=3, engine="simulation", round_timeout_s=900, **TINY, privacy=p)  # type: ignore[arg-type]

    # Execute
    result = run(cfg, out=tmp_path / "run")

    # Assert
    assert [m["round"] for m in result.metrics] == list(range(1, rounds + 1)), result.metrics
    assert [m["epsilon"] for m in result.metrics] == pytest.approx(
        [ledger.epsilon_after(r) for r in range(1, rounds + 1)], rel=1e-4
    )
    assert result.to_json()["privacy"]["stopped"].startswith(f"stopped before round {rounds + 1}")
