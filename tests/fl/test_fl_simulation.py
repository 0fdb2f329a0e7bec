"""The same apps on Flower's Simulation Engine (Ray): one job on both engines, and hundreds of virtual clients."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")

from fedge.plugins.fl import FlConfig, run

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

SMALL = {"partition": "iid", "local_epochs": 2, "batch_size": 16, "model": "mlp", "model_options": {"hidden": [32]}}


def _layout(run_dir: Path) -> set[str]:
    # What both engines write; the deployment engine also keeps per-client data files and Flower's daemons' logs.
    return {p.name for p in run_dir.iterdir()} - {"flower", "app"}


def test_same_job_on_both_engines_reaches_comparable_accuracy_with_the_same_layout(tmp_path: Path) -> None:
    # Execute: 4 clients, 3 rounds, the same seed and split, once per engine.
    results = {
        engine: run(FlConfig(clients=4, rounds=3, engine=engine, **SMALL), out=tmp_path / engine)  # type: ignore[arg-type]
        for engine in ("deployment", "simulation")
    }

    # Assert
    deployed, simulated = results["deployment"], results["simulation"]
    assert [m["round"] for m in simulated.metrics] == [1, 2, 3] == [m["round"] for m in deployed.metrics]
    assert all(m["num_clients"] == 4 for m in simulated.metrics + deployed.metrics)
    assert simulated.accuracy > 0.6 and deployed.accuracy > 0.6
    assert abs(simulated.accuracy - deployed.accuracy) < 0.1
    assert _layout(simulated.run_dir) == _layout(deployed.run_dir)
    assert (simulated.run_dir / "checkpoints" / "round-0003.pt").is_file()


def test_hundreds_of_virtual_clients_a_few_sampled_per_round(tmp_path: Path) -> None:
    cfg = FlConfig(clients=240, fraction_train=0.05, rounds=2, engine="simulation", **SMALL)  # type: ignore[arg-type]

    result = run(cfg, out=tmp_path / "run")

    assert [m["sampled"] for m in result.metrics] == [12, 12]
    assert all(m["num_clients"] == 12 for m in result.metrics)
    # (the session's leftover-process check covers Ray's raylet, gcs_server and ray:: workers)


def test_client_that_drops_out_is_recorded_and_the_round_aggregates_the_others(tmp_path: Path) -> None:
    # Prepare: client 1 is never available; client 0 trains one local epoch instead of the run's two.
    profiles = {"0": {"local_epochs": 1}, "1": {"dropout": 1.0}}
    cfg = FlConfig(clients=4, rounds=2, engine="simulation", client_profiles=profiles, **SMALL)  # type: ignore[arg-type]

    # Execute
    result = run(cfg, out=tmp_path / "run")

    # Assert: all four sampled each round; the dropout is recorded as such (not as a rejected update), always
    # the same node; the others were aggregated.
    first, second = result.metrics
    assert [len(m["sampled_nodes"]) for m in result.metrics] == [4, 4]
    assert first["dropped"] == second["dropped"] == 1 and first["rejected"] == second["rejected"] == 0
    assert first["dropped_nodes"] == second["dropped_nodes"]
    assert first["num_clients"] == second["num_clients"] == 3
    assert set(first["answered_nodes"]).isdisjoint(first["dropped_nodes"])
