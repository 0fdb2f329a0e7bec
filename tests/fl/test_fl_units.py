"""In-process tests of the federated app logic: config, reply screening, aggregators (Flower's strategies
driven with real Messages), the round loop on an in-process Grid, certificates and process teardown."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.errors import ConfigError
from fedge.plugins.fl.config import FlConfig, load_config
from fedge.registry import Kind, Registry

flwr_app = pytest.importorskip("flwr.app")
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message

AGGREGATORS = Registry(Kind.AGGREGATOR).names()  # every installed aggregator, third-party ones too
BUILTIN_AGGREGATORS = {"bulyan", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox",
                       "fedtrimmedavg", "fedyogi", "krum", "multikrum"}  # fmt: skip


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps new Messages with the running task's identity, which flwr-serverapp sets in a real run.
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _reply(arrays: dict[str, np.ndarray], *, node_id: int, num_examples: int = 10) -> Message:
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=node_id, dst_node_id=0, reply_to_message_id=f"m{node_id}",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )  # fmt: skip
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.1}),
        }
    )
    return make_message(metadata=metadata, content=content)


# -- config ----------------------------------------------------------------------------------------------
def test_config_defaults_are_the_main_job() -> None:
    cfg = load_config()

    assert (cfg.dataset, cfg.model, cfg.aggregator) == ("digits", "cnn", "fedavg")
    assert cfg.partition_config.scheme in ("dirichlet", "shards")
    assert cfg.required_clients == cfg.clients


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"partition": "zipf:2"}, "bad partition"),
        ({"clients": 0}, "clients must be >= 1"),
        ({"faults": {"7": "nan"}}, "faults must map"),
        ({"faults": {"0": "explode"}}, "faults must map"),
        ({"min_clients": 9}, "min_clients must be between"),
        ({"roundz": 3}, "unknown setting fl.roundz"),
    ],
)
def test_config_rejects_bad_values_in_one_line(overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(None, overrides)

    assert "\n" not in str(err.value)


def test_config_reads_toml_fl_table(tmp_path: Path) -> None:
    path = tmp_path / "fl.toml"
    path.write_text('[fl]\nclients = 3\nrounds = 2\nmodel_options = { channels = [4] }\n', encoding="utf-8")

    cfg = load_config(path, {"rounds": 4})

    assert (cfg.clients, cfg.rounds, cfg.model_options) == (3, 4, {"channels": [4]})


# -- screening -------------------------------------------------------------------------------------------
def test_screen_replies_rejects_nan_inf_shape_and_keeps_good() -> None:
    from fedge.plugins.fl.guard import screen_replies

    reference = {"w": (2, 3), "b": (3,)}
    good = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    replies = [
        _reply(good, node_id=1),
        _reply({**good, "w": np.full((2, 3), np.nan, np.float32)}, node_id=2),
        _reply({**good, "b": np.array([0, np.inf, 0], np.float32)}, node_id=3),
        _reply({**good, "w": np.ones((3, 2), np.float32)}, node_id=4),
        _reply({"w": good["w"]}, node_id=5),
        _reply(good, node_id=6, num_examples=0),
    ]

    kept, rejected = screen_replies(replies, reference)

    assert [int(m.metadata.src_node_id) for m in kept] == [1]
    reasons = {r.node_id: r.reason for r in rejected}
    assert "non-finite" in reasons[2] and "non-finite" in reasons[3]
    assert "wrong shape for w" in reasons[4]
    assert "missing ['b']" in reasons[5]
    assert "num-examples must be a positive number" in reasons[6]


# -- aggregators -----------------------------------------------------------------------------------------
def test_flowers_strategies_are_all_registered() -> None:
    assert BUILTIN_AGGREGATORS <= set(AGGREGATORS)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_every_aggregator_builds_a_strategy_that_declares_and_keeps_its_state(name: str) -> None:
    from flwr.serverapp.strategy import Strategy

    from fedge.plugins.aggregators import aggregator_registry, build_aggregator, load_strategy_state

    # Prepare: the plugin passes the kind's protocol.
    plugin = aggregator_registry().get(name)

    # Execute: build it and run two rounds of aggregation, as the server loop does.
    agg = build_aggregator(name)
    arrays = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    for server_round in (1, 2):
        arrays = _aggregate_once(agg.strategy, server_round, arrays, seed=server_round)
    saved = agg.state_arrays()

    # Assert: a Strategy; every saved entry belongs to a declared attribute; a fresh one takes the state back.
    assert isinstance(agg.strategy, Strategy)
    assert agg.state == dict(plugin.checkpoint_state)
    assert {k.split("/")[0] for k in saved} <= set(agg.state)
    fresh = build_aggregator(name)
    load_strategy_state(fresh.strategy, saved, fresh.state, shapes={"w": (3, 2), "b": (2,)})
    again = fresh.state_arrays()
    assert saved.keys() == again.keys() and all(np.array_equal(saved[k], again[k]) for k in saved)


@pytest.mark.parametrize(
    ("name", "flower_class", "options"),
    [
        ("fedavg", "FedAvg", {}), ("fedavgm", "FedAvgM", {"server_momentum": 0.5}),
        ("fedprox", "FedProx", {"proximal_mu": 0.3}), ("fedadam", "FedAdam", {"beta_2": 0.5}),
        ("fedyogi", "FedYogi", {"eta": 0.5}), ("fedadagrad", "FedAdagrad", {"tau": 0.5}),
        ("fedmedian", "FedMedian", {}), ("fedtrimmedavg", "FedTrimmedAvg", {"beta": 0.3}),
        ("krum", "Krum", {"num_malicious_nodes": 2}), ("multikrum", "MultiKrum", {"num_nodes_to_select": 3}),
        ("bulyan", "Bulyan", {"num_malicious_nodes": 1}),
    ],
)  # fmt: skip
def test_aggregator_builds_flowers_strategy_with_its_options_and_sampling(
    name: str, flower_class: str, options: dict
) -> None:
    from flwr.serverapp import strategy as flower_strategies

    from fedge.plugins.aggregators import Sampling, build_strategy

    strategy = build_strategy(name, options, Sampling(fraction_train=0.5, min_train_nodes=3))

    assert type(strategy) is getattr(flower_strategies, flower_class)
    assert (strategy.fraction_train, strategy.min_train_nodes, strategy.min_available_nodes) == (0.5, 3, 3)
    for key, value in options.items():
        assert getattr(strategy, key) == value


def test_aggregator_option_error_names_the_setting() -> None:
    from fedge.plugins.aggregators import build_strategy

    with pytest.raises(ConfigError, match="aggregator.fedtrimmedavg.*beta"):
        build_strategy("fedtrimmedavg", {"beta": 0.7})


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("krum", {"num_malicious_nodes": -1}, "num_malicious_nodes must be >= 0"),
        ("bulyan", {"num_malicious_nodes": -1}, "num_malicious_nodes must be >= 0"),
        ("multikrum", {"num_nodes_to_select": 0}, "num_nodes_to_select >= 1"),
    ],
)
def test_byzantine_aggregators_refuse_meaningless_counts(name: str, options: dict, expected: str) -> None:
    from fedge.plugins.aggregators import build_strategy

    with pytest.raises(ConfigError, match=f"aggregator.{name}.*{expected}"):
        build_strategy(name, options)


def _trained_mlp() -> tuple[object, np.ndarray, np.ndarray]:
    from fedge.plugins.data import load_dataset
    from fedge.plugins.models import build_model
    from fedge.plugins.train.single_process import train_epochs

    data = load_dataset("digits")
    model = build_model("mlp", {}, input_shape=data.input_shape, num_classes=data.num_classes)
    train_epochs(model, data.x_train, data.y_train, epochs=8, batch_size=32, lr=0.05)
    return model, data.x_test, data.y_test


def _accuracy_after(name: str, replies: list[Message], model: object, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from fedge.plugins.aggregators import build_strategy
    from fedge.plugins.fl.server_app import _NodeSnapshot
    from fedge.plugins.train.single_process import evaluate

    strategy = build_strategy(name, {"num_malicious_nodes": 1} if "krum" in name else {})
    state = model.state_dict()  # type: ignore[attr-defined]
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    strategy.configure_train(1, arrays, flwr_app.ConfigRecord({}), _NodeSnapshot([1, 2, 3, 4, 5]))  # type: ignore[arg-type]
    aggregated, _ = strategy.aggregate_train(1, replies)
    model.load_state_dict({k: torch.from_numpy(np.array(v.numpy())) for k, v in aggregated.items()})  # type: ignore[attr-defined]
    return evaluate(model, x, y)[1]  # type: ignore[arg-type]


def test_robust_aggregators_keep_accuracy_where_fedavg_does_not() -> None:
    # Prepare: four honest clients near a good model, one Byzantine client sending huge random weights.
    model, x, y = _trained_mlp()
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    honest_acc = _accuracy_after("fedavg", [_reply(base, node_id=i) for i in range(1, 5)], model, x, y)

    def replies() -> list[Message]:
        out = [_reply({k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype) for k, v in base.items()}, node_id=i)
               for i in range(1, 5)]  # fmt: skip
        out.append(_reply({k: rng.normal(0, 50.0, v.shape).astype(v.dtype) for k, v in base.items()}, node_id=5))
        return out

    # Execute
    results = {name: _accuracy_after(name, replies(), model, x, y) for name in ("fedavg", "fedmedian", "krum")}

    # Assert
    assert honest_acc > 0.9
    assert results["fedavg"] < 0.5
    assert results["fedmedian"] > honest_acc - 0.05
    assert results["krum"] > honest_acc - 0.05


def _aggregate_once(
    strategy: object, server_round: int, arrays: dict[str, np.ndarray], seed: int
) -> dict[str, np.ndarray]:
    """One round of ``strategy`` on ``arrays`` with seven clients' random updates (enough for every built-in's
    client-count rule); returns the new arrays."""
    from fedge.plugins.fl.server_app import _NodeSnapshot

    rng = np.random.default_rng(seed)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    nodes = list(range(1, 8))
    snapshot = _NodeSnapshot(nodes)
    strategy.configure_train(server_round, record, flwr_app.ConfigRecord({}), snapshot)  # type: ignore[attr-defined]
    replies = [_reply({k: v + rng.normal(0, 0.1, v.shape).astype(v.dtype) for k, v in arrays.items()}, node_id=i)
               for i in nodes]  # fmt: skip
    new, _ = strategy.aggregate_train(server_round, replies)  # type: ignore[attr-defined]
    return {k: v.numpy() for k, v in new.items()}


@pytest.mark.parametrize(
    ("name", "options", "kinds"),
    [
        ("fedadam", {}, {"m_t", "v_t"}),
        ("fedyogi", {}, {"m_t", "v_t"}),
        ("fedadagrad", {}, {"m_t", "v_t"}),
        ("fedavgm", {"server_momentum": 0.9}, {"momentum_vector"}),
    ],
)
def test_strategy_state_round_trips_and_the_next_round_matches(
    name: str, options: dict, kinds: set[str], tmp_path: Path
) -> None:
    from fedge.plugins.aggregators import build_aggregator, build_strategy, load_strategy_state, strategy_state

    # Prepare: two rounds give non-trivial moments; save them as a checkpoint does (npz).
    arrays = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    declared = build_aggregator(name, options).state
    original = build_strategy(name, options)
    for server_round in (1, 2):
        arrays = _aggregate_once(original, server_round, arrays, seed=server_round)
    saved = strategy_state(original, declared)
    np.savez(tmp_path / "state.npz", **saved)

    # Execute: a fresh strategy (a resumed ServerApp) loads them.
    restored = build_strategy(name, options)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as data:
        load_strategy_state(restored, {k: data[k] for k in data.files}, declared, shapes={"w": (3, 2), "b": (2,)})

    # Assert: same state, arrays equal and non-zero; and the next round gives the same model.
    assert {k.split("/")[0] for k in saved} == kinds
    again = strategy_state(restored, declared)
    assert saved.keys() == again.keys()
    assert all(np.array_equal(saved[k], again[k]) and saved[k].dtype == again[k].dtype for k in saved)
    assert all(np.abs(v).sum() > 0 for v in saved.values())
    expected = _aggregate_once(original, 3, arrays, seed=3)
    got = _aggregate_once(restored, 3, arrays, seed=3)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    fresh = _aggregate_once(build_strategy(name, options), 3, arrays, seed=3)
    assert not all(np.allclose(expected[k], fresh[k]) for k in expected)  # the state matters


def test_strategy_state_that_does_not_fit_is_refused() -> None:
    from fedge.errors import DataError
    from fedge.plugins.aggregators import build_aggregator

    adam = build_aggregator("fedadam")
    _aggregate_once(adam.strategy, 1, {"w": np.ones((3, 2), np.float32)}, seed=0)

    with pytest.raises(DataError, match="does not belong to FedAvg"):
        build_aggregator("fedavg").load_state(adam.state_arrays())
    with pytest.raises(DataError, match="does not fit the model"):
        build_aggregator("fedadam").load_state(adam.state_arrays(), shapes={"w": (2, 3)})
    assert build_aggregator("fedavg").state_arrays() == {}


# -- round loop on an in-process Grid ---------------------------------------------------------------------
class _LoopbackGrid:
    """A Grid stand-in for the unit test of the round loop: replies come from fedge's own client code."""

    def __init__(self, node_ids: list[int], node_configs: dict[int, dict]) -> None:
        self.node_ids, self.node_configs, self.outbox = node_ids, node_configs, []

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def push_messages(self, messages: list[Message]) -> list[str]:
        from fedge.plugins.fl.client_app import _inject_fault
        from fedge.plugins.fl.local import train_round

        for i, msg in enumerate(messages):
            node = self.node_configs[msg.metadata.dst_node_id]
            config = dict(msg.content["config"])
            arrays, metrics = train_round(config, node, {k: v.numpy() for k, v in msg.content["arrays"].items()})
            if node.get("fault"):
                arrays = _inject_fault(arrays, node["fault"], 0)
            reply = _reply(arrays, node_id=msg.metadata.dst_node_id, num_examples=int(metrics["num-examples"]))
            reply.metadata.__dict__["_reply_to_message_id"] = f"id{i}"
            self.outbox.append(reply)
        return [f"id{i}" for i in range(len(messages))]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        out, self.outbox = self.outbox, []
        return out


def test_round_loop_rejects_nan_client_checkpoints_and_resumes(tmp_path: Path) -> None:
    from fedge.plugins.fl.runner import prepare_data
    from fedge.plugins.fl.server_app import latest_checkpoint, run_rounds
    from fedge.rundir import RunDir

    cfg = FlConfig(clients=3, rounds=2, local_epochs=1, model="mlp", model_options={"hidden": [16]},
                   partition="iid", faults={"2": "nan"})  # fmt: skip
    run = RunDir(tmp_path)
    files = prepare_data(run, cfg)
    configs = {10 + i: {"data-path": str(f), "partition-id": i, **({"fault": "nan"} if i == 2 else {})}
               for i, f in enumerate(files)}  # fmt: skip

    result = run_rounds(_LoopbackGrid(list(configs), configs), run, cfg)  # type: ignore[arg-type]

    metrics = run.read_metrics()
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["num_clients"] == 2 and m["rejected"] == 1 for m in metrics)
    assert "non-finite" in run.file("rejected.jsonl").read_text()
    assert latest_checkpoint(tmp_path)[0] == 2  # type: ignore[index]
    assert np.isfinite(result["loss"]) and result["accuracy"] > 0.3

    # A longer run in the same directory continues after round 2.
    run.write_config({**cfg.to_mapping(), "rounds": 3})
    run_rounds(_LoopbackGrid(list(configs), configs), run, FlConfig(**{**cfg.to_mapping(), "rounds": 3}))  # type: ignore[arg-type]
    assert [m["round"] for m in run.read_metrics()] == [1, 2, 3]


@pytest.mark.parametrize(("aggregator", "options"), [("fedadam", {}), ("fedavgm", {"server_momentum": 0.9})])
def test_round_loop_resume_keeps_the_server_optimizer_state(aggregator: str, options: dict, tmp_path: Path) -> None:
    from fedge.plugins.fl.runner import prepare_data
    from fedge.plugins.fl.server_app import run_rounds, strategy_state_file
    from fedge.rundir import RunDir

    # Prepare: the same 2-round run, uninterrupted in one directory, stopped after round 1 in another.
    cfg = FlConfig(clients=2, rounds=2, local_epochs=1, model="mlp", model_options={"hidden": [16]}, partition="iid",
                   aggregator=aggregator, aggregator_options=options)  # fmt: skip
    runs = {}
    for name, rounds in (("whole", 2), ("resumed", 1)):
        run = RunDir(tmp_path / name)
        configs = {10 + i: {"data-path": str(f), "partition-id": i} for i, f in enumerate(prepare_data(run, cfg))}
        stopped = FlConfig(**{**cfg.to_mapping(), "rounds": rounds})
        run_rounds(_LoopbackGrid(list(configs), configs), run, stopped)  # type: ignore[arg-type]
        runs[name] = (run, configs)

    # Execute: resume the stopped run for round 2 (a fresh strategy, as in a new ServerApp).
    run, configs = runs["resumed"]
    run_rounds(_LoopbackGrid(list(configs), configs), run, cfg)  # type: ignore[arg-type]

    # Assert: round 2 continued from the saved state, so both runs end with the same model.
    import torch

    state_file = strategy_state_file(tmp_path / "resumed" / "checkpoints" / "round-0001.pt")
    with np.load(state_file) as data:
        assert data.files and all(np.abs(data[k]).sum() > 0 for k in data.files)
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "round-0002.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "round-0002.pt", weights_only=True)
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)


# -- liveness: which sampled nodes a round waits for -----------------------------------------------------
class _ScriptedGrid:
    """A Grid stand-in whose nodes answer as scripted: ``ok`` at once, ``silent`` not (until ``answer_late``),
    ``offline`` with the SuperLink's NODE_UNAVAILABLE error (a node that missed its heartbeats)."""

    def __init__(self, behaviour: dict[int, str]) -> None:
        self.behaviour, self.ready, self.held, self.pushed = behaviour, {}, {}, 0

    def get_node_ids(self) -> list[int]:
        return list(self.behaviour)

    def push_messages(self, messages: list[Message]) -> list[str]:
        from flwr.app import Error
        from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

        ids = []
        for msg in messages:
            self.pushed += 1
            mid, node = f"m{self.pushed}", msg.metadata.dst_node_id
            kind = self.behaviour[node]
            if kind == "ok":
                self.ready[mid] = make_message(metadata=self._metadata(mid, node), content=RecordDict())
            elif kind == "offline":
                error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable")
                self.ready[mid] = make_message(metadata=self._metadata(mid, SUPERLINK_NODE_ID), error=error)
            else:
                self.held[mid] = node
            ids.append(mid)
        return ids

    def answer_late(self, node: int) -> None:
        for mid in [m for m, n in self.held.items() if n == node]:
            self.ready[mid] = make_message(metadata=self._metadata(mid, node), content=RecordDict())
            del self.held[mid]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        return [self.ready.pop(i) for i in list(ids) if i in self.ready]

    @staticmethod
    def _metadata(reply_to: str, src: int) -> Metadata:
        return Metadata(run_id=1, message_id="", src_node_id=src, dst_node_id=0, reply_to_message_id=reply_to,
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")  # fmt: skip


def _train_messages(node_ids: list[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="train") for n in node_ids]


def test_node_that_missed_a_round_is_not_waited_for_in_the_next() -> None:
    from fedge.plugins.fl.liveness import NodeQuarantine

    # Prepare: node 3 never answers; round 1 times out on it.
    grid, quarantine = _ScriptedGrid({1: "ok", 2: "ok", 3: "silent"}), NodeQuarantine(poll_s=0.01)
    first = quarantine.send_and_receive(grid, _train_messages([1, 2, 3]), timeout_s=0.2)

    # Execute: the next round has a long timeout.
    start = time.monotonic()
    second = quarantine.send_and_receive(grid, _train_messages([1, 2, 3]), timeout_s=60)
    second_s = time.monotonic() - start

    # Assert: round 2 ended once nodes 1 and 2 answered, far from its 60 s timeout.
    assert first.timed_out == [3] and len(first.replies) == 2
    assert second.quarantined == [3] and second.timed_out == [] and len(second.replies) == 2
    assert second_s < 60 / 2
    assert quarantine.nodes == {3}


def test_node_flower_reports_offline_is_dropped_not_rejected() -> None:
    from fedge.plugins.fl.liveness import NodeQuarantine

    grid, quarantine = _ScriptedGrid({1: "ok", 2: "offline"}), NodeQuarantine(poll_s=0.01)

    got = quarantine.send_and_receive(grid, _train_messages([1, 2]), timeout_s=60)

    assert got.offline == [2] and got.timed_out == []
    assert [m.metadata.src_node_id for m in got.replies] == [1]  # the SuperLink's error is no client reply
    assert quarantine.nodes == {2}


def test_late_reply_releases_a_quarantined_node() -> None:
    from fedge.plugins.fl.liveness import NodeQuarantine

    # Prepare: node 2 misses round 1, so round 2 does not wait for it either.
    grid, quarantine = _ScriptedGrid({1: "ok", 2: "silent"}), NodeQuarantine(poll_s=0.01)
    quarantine.send_and_receive(grid, _train_messages([1, 2]), timeout_s=0.1)
    quarantine.send_and_receive(grid, _train_messages([1, 2]), timeout_s=60)
    assert quarantine.nodes == {2}

    # Execute: node 2 answers its old messages, then answers in time again.
    grid.answer_late(2)
    grid.behaviour[2] = "ok"
    got = quarantine.send_and_receive(grid, _train_messages([1, 2]), timeout_s=60)

    # Assert: its stale replies were dropped; this round's reply counts.
    assert quarantine.nodes == set()
    assert sorted(m.metadata.src_node_id for m in got.replies) == [1, 2]


def test_round_of_only_quarantined_nodes_waits_for_them() -> None:
    from fedge.plugins.fl.liveness import NodeQuarantine

    grid, quarantine = _ScriptedGrid({1: "silent"}), NodeQuarantine(poll_s=0.01)
    quarantine.send_and_receive(grid, _train_messages([1]), timeout_s=0.1)

    grid.behaviour[1] = "ok"
    got = quarantine.send_and_receive(grid, _train_messages([1]), timeout_s=60)

    assert len(got.replies) == 1 and got.quarantined == [] and quarantine.nodes == set()


def test_supernode_id_is_read_from_its_log(tmp_path: Path) -> None:
    from fedge.plugins.fl.federation import _logged_node_id

    log = tmp_path / "supernode-0.log"
    log.write_text("INFO :      Starting Flower SuperNode\nINFO :      SuperNode ID: 17779299247328387579\n")

    assert _logged_node_id(log) == 17779299247328387579
    assert _logged_node_id(tmp_path / "none.log") is None


# -- certificates and teardown ----------------------------------------------------------------------------
def test_certs_have_loopback_san_and_node_keys_load(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedge.plugins.fl.certs import make_certs, make_node_keys

    paths = make_certs(tmp_path, hosts=["superlink.lan"])
    pairs = make_node_keys(tmp_path, num_nodes=2)

    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert "superlink.lan" in san.get_values_for_type(x509.DNSName)
    assert load_ssh_private_key(pairs[1][0].read_bytes(), None) is not None
    assert load_ssh_public_key(pairs[1][1].read_bytes()) is not None


def test_terminate_tree_kills_detached_grandchildren() -> None:
    from fedge.supervisor import alive as _alive
    from fedge.supervisor import descendants, terminate_tree

    # A parent in its own session that starts a child in yet another session (as Flower's daemons do).
    code = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)'], start_new_session=True); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 20
    while not descendants(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = descendants(parent.pid)

    terminate_tree([parent.pid], grace_s=2)
    parent.wait(timeout=10)

    assert children and not any(_alive(p) for p in children)


# -- CLI errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fl", "superlink", "--clients", "2"], "refusing to serve plaintext on 0.0.0.0"),
        (["fl", "supernode", "--superlink", "10.0.0.5:9092", "--partition", "0/2"], "refusing plaintext to 10.0.0.5"),
        (["fl", "supernode", "--superlink", "nowhere", "--partition", "0/2"], "bad --superlink"),
        (["fl", "run", "--aggregator", "fedmean"], "unknown aggregator 'fedmean'; valid: bulyan"),
        (["fl", "run", "--fault", "1:nan"], "bad --fault"),
        (["fl", "run", "--resume", "no/such/dir"], "cannot resume"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fedge.cli.app import main

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 1
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("as_json", [False, True], ids=["progress", "json"])
@pytest.mark.parametrize(
    ("toml", "argv", "expected"),
    [
        ("", ["--dataset", "npz"], (
            "dataset 'npz' needs dataset_options.path; it has no flag: "
            'put  [dataset_options] path = "..."  in a TOML file and pass the file: fedge fl run FILE.toml'
        )),
        ("", ["--dataset", "csv"], "dataset 'csv' needs dataset_options.path"),
        ('dataset = "image-folder"\n', [], "dataset 'image-folder' needs dataset_options.path"),
        ('[dataset_options]\npath = "no/such.npz"\n', ["--dataset", "npz"], "npz file 'no/such.npz' not found"),
        ('dataset = "csv"\n[dataset_options]\npath = "no/such.csv"\n', [], "CSV file 'no/such.csv' not found"),
        ('[dataset_options]\npath = "no/such"\n', ["--dataset", "image-folder"], "image folder 'no/such' not found"),
        ('[dataset_options]\npath = "x.npz"\nlabel = "y"\n', ["--dataset", "npz"],
         "unknown setting dataset_options.label"),
        ("", ["--clients", "5000"], "cannot split"),
    ],
    ids=["npz-no-path", "csv-no-path", "image-folder-no-path", "npz-missing-file", "csv-missing-file",
         "image-folder-missing-dir", "unknown-option", "too-many-clients"],
)  # fmt: skip
def test_cli_run_with_bad_data_fails_in_one_line_and_leaves_no_run_dir(
    toml: str, argv: list[str], expected: str, as_json: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from fedge.cli.app import main

    # Prepare: the default run directory would be runs/fl-<timestamp> under the working directory.
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "fl.toml"
    config.write_text(toml, encoding="utf-8")
    given = ["--out", str(tmp_path / "run")] if as_json else []

    # Execute
    argv = ["fl", "run", str(config), "--rounds", "1", "--clients", "2", *argv, *given]
    code = main(argv + (["--json"] if as_json else []))

    # Assert
    err = capsys.readouterr().err
    assert code == 1
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fl.toml"]


def test_run_api_reads_the_data_before_it_creates_the_run_dir(tmp_path: Path) -> None:
    from fedge.errors import DataError
    from fedge.plugins.fl import run

    with pytest.raises(DataError, match="not found"):
        run(FlConfig(dataset="npz", dataset_options={"path": str(tmp_path / "none.npz")}), out=tmp_path / "run")
    with pytest.raises(ConfigError, match="cannot resume"):
        run(resume=tmp_path / "gone")

    assert list(tmp_path.iterdir()) == []


def test_global_model_unchanged_when_every_update_is_rejected(tmp_path: Path) -> None:
    import torch

    from fedge.plugins.fl.runner import prepare_data
    from fedge.plugins.fl.server_app import run_rounds
    from fedge.plugins.models import build_model
    from fedge.rundir import RunDir

    cfg = FlConfig(clients=2, rounds=1, local_epochs=1, model="mlp", model_options={"hidden": [16]}, partition="iid")
    run = RunDir(tmp_path)
    files = prepare_data(run, cfg)
    configs = {10 + i: {"data-path": str(f), "fault": kind} for i, (f, kind) in enumerate(zip(files, ["shape", "inf"]))}
    initial = build_model("mlp", {"hidden": [16]}, input_shape=(1, 8, 8), num_classes=10).state_dict()

    run_rounds(_LoopbackGrid(list(configs), configs), run, cfg)  # type: ignore[arg-type]

    after = torch.load(tmp_path / "checkpoints" / "round-0001.pt", weights_only=True)
    assert run.read_metrics()[0]["num_clients"] == 0 and run.read_metrics()[0]["rejected"] == 2
    assert all(torch.equal(initial[k], after[k]) for k in initial)


# -- heterogeneous client profiles -----------------------------------------------------------------------
def test_client_profiles_are_drawn_the_same_way_every_time_and_tables_override_them() -> None:
    from fedge.plugins.fl.profiles import dropped_out, profile_for

    drawn = [profile_for(i, seed=3, heterogeneity="lognormal:0.8", profiles={}) for i in range(6)]
    again = [profile_for(i, seed=3, heterogeneity="lognormal:0.8", profiles={}) for i in range(6)]
    given = profile_for(2, seed=3, heterogeneity="lognormal:0.8", profiles={"2": {"slowdown": 5, "dropout": 1}})

    assert drawn == again and all(p.slowdown >= 1 for p in drawn) and len({p.slowdown for p in drawn}) == 6
    assert profile_for(0, seed=3, heterogeneity="", profiles={}).slowdown == 1.0
    assert (given.slowdown, given.dropout) == (5, 1)
    assert all(dropped_out(given, seed=3, partition_id=2, server_round=r) for r in range(1, 5))
    assert not any(dropped_out(drawn[0], seed=3, partition_id=0, server_round=r) for r in range(1, 5))


@pytest.mark.parametrize(
    ("profiles", "expected"),
    [
        ({"9": {"dropout": 0.5}}, "partition id < 3"),
        ({"0": {"dropout": 1.5}}, "dropout must be in [0, 1]"),
        ({"0": {"slowdown": 0.5}}, "slowdown must be a finite number >= 1"),
        ({"0": {"speed": 2}}, "unknown setting speed"),
    ],
)
def test_bad_client_profiles_are_refused(profiles: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, {"clients": 3, "client_profiles": profiles})
