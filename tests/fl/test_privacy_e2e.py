"""Differential privacy and SecAgg+ in real federations: a SuperLink and SuperNodes over gRPC on 127.0.0.1.

Two or three clients, one to three rounds, a tiny CNN: the tests are about what the server reports and holds,
not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedge.cli.app import main
from fedge.plugins.fl import FlConfig, run
from fedge.plugins.fl.privacy import PrivacyConfig, PrivacyLedger
from fedge.plugins.fl.secagg import quantization_error

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TINY = {"model_options": {"channels": [4], "hidden": 16}, "local_epochs": 1, "batch_size": 32, "partition": "iid"}


def _tiny_toml(tmp_path: Path) -> str:
    path = tmp_path / "fl.toml"
    path.write_text(
        'local_epochs = 1\nbatch_size = 32\npartition = "iid"\nmodel_options = { channels = [4], hidden = 16 }\n',
        encoding="utf-8",
    )
    return str(path)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_central_dp_cli_reports_epsilon_each_round_and_stops_at_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: with 2 clients and noise multiplier 3, a budget of ε=2.5 holds 2 rounds of the 3 asked for.
    out = tmp_path / "run"
    privacy = ["--dp", "central", "--noise-multiplier", "3", "--clip", "0.5", "--target-epsilon", "2.5"]
    expected = PrivacyLedger(PrivacyConfig(dp="central", noise_multiplier=3.0), population_size=2)

    # Execute
    code = main(["fl", "run", _tiny_toml(tmp_path), "-n", "2", "-r", "3", *privacy, "--out", str(out), "--json"])

    # Assert
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    metrics = _metrics(out)
    assert [m["round"] for m in metrics] == [1, 2]
    assert [m["epsilon"] for m in metrics] == pytest.approx(
        [expected.epsilon_after(1), expected.epsilon_after(2)], rel=1e-4
    )
    assert all(m["delta"] == 1e-5 for m in metrics)
    assert result["privacy"]["epsilon"] == pytest.approx(metrics[-1]["epsilon"])
    assert "stopped before round 3" in result["privacy"]["stopped"]


def test_local_dp_run_reports_epsilon_per_client_and_stops_at_the_target(tmp_path: Path) -> None:
    p = PrivacyConfig(dp="local", noise_multiplier=3.0, clip=0.5, target_epsilon=2.1)
    cfg = FlConfig(clients=2, rounds=3, **TINY, privacy=p)  # type: ignore[arg-type]

    result = run(cfg, out=tmp_path / "run")

    ledger = PrivacyLedger(p, population_size=2)
    assert [m["round"] for m in result.metrics] == [1, 2] and ledger.rounds_within_budget(3) == 2
    assert result.metrics[-1]["epsilon"] == pytest.approx(ledger.epsilon_after(2), rel=1e-4)
    assert result.to_json()["privacy"]["stopped"].startswith("stopped before round 3")


def test_secagg_aggregate_equals_plain_fedavg_within_quantization(tmp_path: Path) -> None:
    plain = run(FlConfig(clients=2, rounds=1, **TINY), out=tmp_path / "plain")  # type: ignore[arg-type]
    p = PrivacyConfig(secagg=True)
    secure = run(FlConfig(clients=2, rounds=1, **TINY, privacy=p), out=tmp_path / "secure")  # type: ignore[arg-type]

    a = torch.load(plain.run_dir / "checkpoints" / "round-0001.pt", weights_only=True)
    b = torch.load(secure.run_dir / "checkpoints" / "round-0001.pt", weights_only=True)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Within the rounding of 2 quantized updates, and not 0: the mean did come through SecAgg+'s integer grid.
    assert 0 < diff <= 2 * quantization_error(p) + 1e-6
    assert plain.metrics[0]["num_clients"] == secure.metrics[0]["num_clients"] == 2


def test_secagg_survives_a_client_killed_mid_round_within_the_threshold(tmp_path: Path) -> None:
    # 3 clients, threshold 2: client 1's SuperNode is killed when it is asked to train (after the key exchange).
    p = PrivacyConfig(secagg=True, secagg_timeout_s=45.0)
    cfg = FlConfig(clients=3, rounds=1, **TINY, privacy=p, faults={"1": "crash"})  # type: ignore[arg-type]

    result = run(cfg, out=tmp_path / "run")

    assert result.metrics[0]["num_clients"] == 2 and result.metrics[0]["timed_out"] == 1
    model = torch.load(result.run_dir / "checkpoints" / "round-0001.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in model.values()) and result.loss < 2.35  # ln(10) = 2.30: guessing


def test_secagg_over_the_threshold_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"

    code = main(["fl", "run", _tiny_toml(tmp_path), "-n", "3", "-r", "1", "--secagg", "--secagg-timeout-s", "45",
                 "--fault", "1=crash", "--fault", "2=crash", "--out", str(out)])  # fmt: skip

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    line = next(e for e in err if "secure aggregation failed" in e)
    assert "1 of 3 clients still answered, below the reconstruction threshold of 2" in line
    assert not any("Traceback" in e for e in err)
