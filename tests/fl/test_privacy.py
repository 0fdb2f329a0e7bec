"""Differential privacy and secure aggregation: settings refused in one line, the (ε, δ) ledger, and the round
loop with Flower's DP wrappers and SecAgg+ workflow driving fedge's real ClientApp (its mods included) in-process.

The federations over gRPC are in test_privacy_e2e.py.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedge.cli.app import main
from fedge.errors import ConfigError, RuntimeFailure
from fedge.plugins.fl import FlConfig
from fedge.plugins.fl.privacy import PrivacyConfig, PrivacyLedger

MLP = {"model": "mlp", "model_options": {"hidden": [16]}, "local_epochs": 1, "partition": "iid"}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    # Flower stamps every new Message with the run id of the process's task; give this process one.
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class _ClientAppGrid:
    """A Grid whose nodes are fedge's real ClientApp (mods and training) called in this process.

    It records every message the server receives, so a test can look at all the server ever held.
    """

    def __init__(self, node_configs: dict[int, dict[str, Any]], *, lost: frozenset[int] = frozenset()) -> None:
        from fedge.plugins.fl.client_app import app

        self.app, self.node_configs, self.lost = app, node_configs, lost
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config={})
                         for n, c in node_configs.items()}  # fmt: skip
        self.received: list[Message] = []
        self._ids = itertools.count()
        self._outbox: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def _answer(self, msg: Message) -> Message | None:
        msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
        node = msg.metadata.dst_node_id
        is_fit = (
            "secaggplus_configs" not in msg.content.config_records or "fitins.parameters" in msg.content.array_records
        )
        if node in self.lost and is_fit:  # this node is gone from the round on: no answer to training or later
            self.node_configs[node]["gone"] = True
        if self.node_configs[node].get("gone"):
            return None
        # A copy, as the wire would give it: the workflow sends one content object to several nodes.
        delivered = Message(content=copy.deepcopy(msg.content), metadata=copy.copy(msg.metadata))
        reply = self.app(delivered, self.contexts[node])
        self.received.append(reply)
        return reply

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        return [r for r in (self._answer(m) for m in messages) if r is not None]

    def push_messages(self, messages: list[Message]) -> list[str]:
        self._outbox += [r for r in (self._answer(m) for m in messages) if r is not None]
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: Any) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out


def _loop(
    tmp_path: Path, cfg: FlConfig, **grid_kwargs: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], _ClientAppGrid]:
    from fedge.plugins.fl.runner import prepare_data
    from fedge.plugins.fl.server_app import run_rounds
    from fedge.rundir import RunDir

    run = RunDir(tmp_path)
    configs = {10 + i: {"data-path": str(f), "partition-id": i} for i, f in enumerate(prepare_data(run, cfg))}
    grid = _ClientAppGrid(configs, **grid_kwargs)
    result = run_rounds(grid, run, cfg)  # type: ignore[arg-type]
    return result, run.read_metrics(), grid


# -- settings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--dp", "central", "--noise-multiplier", "nan"], "noise_multiplier must be a finite number"),
        (["--dp", "central", "--delta", "2"], "privacy.delta must be in (0, 1), got 2.0"),
        (["--dp", "central", "--noise-multiplier", "0"], "noise_multiplier must be > 0 with dp=central"),
        (["--dp", "local", "--clipping", "adaptive"], "adaptive is central DP only"),
        (["--dp", "sideways"], "privacy.dp must be one of off, central, local"),
        (["--target-epsilon", "3"], "target_epsilon needs dp = central or local"),
        (["--secagg", "--dp", "central"], "the server cannot clip it: use clip_on = client"),
        (["--secagg", "-a", "fedmedian"], "--secagg cannot run with aggregator 'fedmedian' (Flower's FedMedian)"),
        (["--secagg", "-a", "fedtrimmedavg"], "it needs each client's update, which SecAgg+ hides"),
        (["--secagg", "--secagg-reconstruction-threshold", "1.5"], "as a share must be in (0, 1], got 1.5"),
        (["--dp", "central", "--target-epsilon", "0.5"], "below the ε of a single round"),
        (["--dp", "central", "-a", "fedmedian", "--target-epsilon", "50"], "--target-epsilon cannot be enforced"),
        (["--dp", "central", "--clipping", "adaptive", "--noise-multiplier", "3"], "clipped_count_stddev"),
    ],
)
def test_bad_privacy_settings_are_one_line_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    out = tmp_path / "run"

    code = main(["fl", "run", "--clients", "3", "--rounds", "2", *argv, "--out", str(out)])

    err = capsys.readouterr().err.strip()
    assert code == 1
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_ledger_is_flowers_rdp_accountant_over_the_gaussian_releases() -> None:
    from dp_accounting import dp_event, rdp

    p = PrivacyConfig(dp="central", noise_multiplier=1.1, delta=1e-5, target_epsilon=8.0)
    ledger = PrivacyLedger(p, population_size=4)
    reference = rdp.RdpAccountant()

    for _ in range(3):
        ledger.compose(num_replies=4, num_sampled=4)
        reference.compose(dp_event.GaussianDpEvent(1.1))
    ledger.compose(num_replies=2, num_sampled=4)  # half the clients answered: the mean got half the noise it needs
    reference.compose(dp_event.GaussianDpEvent(0.55))

    assert ledger.spent()["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-5)
    assert ledger.rounds_within_budget(100) == max(r for r in range(1, 100) if ledger.epsilon_after(r) <= 8.0)
    assert ledger.would_exceed()  # 4.x spent; one more full round at 1.1 passes 8


def test_median_with_central_dp_says_why_no_epsilon(tmp_path: Path) -> None:
    from fedge.plugins.aggregators import build_strategy
    from fedge.plugins.fl.privacy import check_privacy

    cfg = FlConfig(clients=3, aggregator="fedmedian", privacy=PrivacyConfig(dp="central"))

    notes = check_privacy(cfg, build_strategy("fedmedian"))

    assert len(notes) == 1 and "ε is not reported" in notes[0] and "FedMedian" in notes[0]


# -- the round loop, in-process ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "privacy",
    [
        {"dp": "central", "noise_multiplier": 3.0, "clip": 0.5},
        {
            "dp": "central",
            "noise_multiplier": 3.0,
            "clip": 0.5,
            "clip_on": "client",
            "clipping": "adaptive",
            "clipped_count_stddev": 2.0,
        },
        {"dp": "local", "noise_multiplier": 3.0, "clip": 0.5},
    ],
    ids=["central-server-fixed", "central-client-adaptive", "local"],
)
def test_dp_round_loop_reports_epsilon_each_round_and_stops_at_the_target(
    tmp_path: Path, privacy: dict[str, Any]
) -> None:
    p = PrivacyConfig(**privacy, target_epsilon=2.5)
    ledger = PrivacyLedger(p, population_size=2)
    fit = ledger.rounds_within_budget(10)
    assert 1 <= fit < 4
    cfg = FlConfig(clients=2, rounds=4, **MLP, privacy=p)  # type: ignore[arg-type]

    result, metrics, _ = _loop(tmp_path, cfg)

    assert [m["round"] for m in metrics] == list(range(1, fit + 1))
    epsilons = [m["epsilon"] for m in metrics]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 2.5 and all(m["delta"] == 1e-5 for m in metrics)
    assert epsilons[-1] == pytest.approx(ledger.epsilon_after(fit), rel=1e-4)
    assert result["rounds"] == fit and "would spend more than target_epsilon 2.5" in result["privacy"]["stopped"]
    assert json.loads((tmp_path / "privacy-ledger.json").read_text())["compositions"]


def test_secagg_round_equals_fedavg_within_quantization_and_the_server_holds_no_update(tmp_path: Path) -> None:
    from fedge.plugins.fl.secagg import quantization_error

    plain_cfg = FlConfig(clients=3, rounds=1, **MLP)  # type: ignore[arg-type]
    secure_cfg = FlConfig(clients=3, rounds=1, **MLP, privacy=PrivacyConfig(secagg=True))  # type: ignore[arg-type]

    _, plain_metrics, _ = _loop(tmp_path / "plain", plain_cfg)
    _, secure_metrics, grid = _loop(tmp_path / "secure", secure_cfg)

    import torch

    plain = torch.load(tmp_path / "plain" / "checkpoints" / "round-0001.pt", weights_only=True)
    secure = torch.load(tmp_path / "secure" / "checkpoints" / "round-0001.pt", weights_only=True)
    # Each of the 3 weighted updates is rounded to the grid once, and the weights themselves too.
    bound = 3 * quantization_error(secure_cfg.privacy) + 1e-6
    assert max(float((plain[k] - secure[k]).abs().max()) for k in plain) <= bound
    assert plain_metrics[0]["num_clients"] == secure_metrics[0]["num_clients"] == 3
    # What the server received: no client arrays at all, and masked vectors that look uniformly random over the
    # mask range (a client's quantized model alone would sit in [0, 2**22) x its weight, far below 2**32).
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    masked = [r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] for r in grid.received
              if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})]  # fmt: skip
    assert len(masked) == 3
    assert all(len(record) == 0 for r in grid.received for record in r.content.array_records.values())
    for vectors in masked:
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in vectors]).astype(np.float64)
        assert abs(values.mean() / 2**32 - 0.5) < 0.05 and abs(values.std() / 2**32 - 12**-0.5) < 0.05


def test_secagg_tolerates_a_lost_client_within_the_threshold_and_fails_in_one_line_beyond(tmp_path: Path) -> None:
    cfg = FlConfig(clients=3, rounds=1, **MLP, privacy=PrivacyConfig(secagg=True, secagg_timeout_s=1.0))  # type: ignore[arg-type]

    result, metrics, _ = _loop(tmp_path / "one", cfg, lost=frozenset({11}))
    assert metrics[0]["num_clients"] == 2 and metrics[0]["timed_out"] == 1 and np.isfinite(result["loss"])

    with pytest.raises(RuntimeFailure, match=r"secure aggregation failed at its collect masked vectors stage: 1 of 3"):
        _loop(tmp_path / "two", cfg, lost=frozenset({11, 12}))


def test_secagg_with_client_side_dp_reports_epsilon(tmp_path: Path) -> None:
    p = PrivacyConfig(secagg=True, dp="central", clip_on="client", noise_multiplier=1.0, clip=1.0)
    cfg = FlConfig(clients=3, rounds=2, **MLP, privacy=p)  # type: ignore[arg-type]

    _, metrics, _ = _loop(tmp_path, cfg)

    assert [m["num_clients"] for m in metrics] == [3, 3]
    assert metrics[1]["epsilon"] == pytest.approx(PrivacyLedger(p, population_size=3).epsilon_after(2), rel=1e-4)


def test_privacy_config_from_toml_table(tmp_path: Path) -> None:
    from fedge.plugins.fl.config import load_config

    path = tmp_path / "fl.toml"
    path.write_text('[fl]\nclients = 3\n[fl.privacy]\ndp = "local"\nnoise_multiplier = 1.5\n', encoding="utf-8")

    cfg = load_config(path, {"privacy": {"target_epsilon": 9.0}})

    assert cfg.privacy == PrivacyConfig(dp="local", noise_multiplier=1.5, target_epsilon=9.0)
    with pytest.raises(ConfigError, match="unknown setting fl.privacy.epsilon"):
        load_config(None, {"privacy": {"epsilon": 1}})


def test_a_resumed_dp_run_keeps_what_it_spent(tmp_path: Path) -> None:
    p = PrivacyConfig(dp="central", noise_multiplier=2.0, clip=0.5)
    first = FlConfig(clients=2, rounds=1, **MLP, privacy=p)  # type: ignore[arg-type]

    _loop(tmp_path, first)
    _, metrics, _ = _loop(tmp_path, FlConfig(**{**first.to_mapping(), "rounds": 2}))

    assert [m["round"] for m in metrics] == [1, 2]
    assert metrics[1]["epsilon"] == pytest.approx(PrivacyLedger(p, population_size=2).epsilon_after(2), rel=1e-4)
