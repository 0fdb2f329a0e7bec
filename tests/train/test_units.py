"""Unit tests of the cluster-training pieces that need no process group: configs, lr rule, batch order,
checkpoint pointer, torchrun command line, size parsing, world-size checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedge.errors import ConfigError, DataError
from fedge.plugins.strategies.allreduce import AllReduce
from fedge.plugins.strategies.parameter_server import ParameterServer
from fedge.plugins.strategies.ring_allreduce import RingAllReduce
from fedge.plugins.train import checkpoint
from fedge.plugins.train.base import DistContext, StrategyConfig, resolve_strategy
from fedge.plugins.train.bench import parse_size
from fedge.plugins.train.config import TrainConfig, parse_nnodes
from fedge.plugins.train.launcher import _log_reason, torchrun_command
from fedge.plugins.train.trainer import BatchOrder, _describe_failure

CTX = DistContext(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))


def test_linear_lr_scaling_ramps_over_warmup_then_holds() -> None:
    cfg = StrategyConfig(lr=0.1, lr_scaling="linear", base_batch_size=32, warmup_steps=4)
    strategy = RingAllReduce(RingAllReduce.Config(lr=0.1, lr_scaling="linear", base_batch_size=32, warmup_steps=4), CTX)

    lrs = [strategy.lr_at(s, 128) for s in range(6)]

    assert lrs == pytest.approx([0.175, 0.25, 0.325, 0.4, 0.4, 0.4])
    assert cfg.lr == 0.1


def test_without_scaling_lr_is_constant() -> None:
    strategy = AllReduce(AllReduce.Config(lr=0.2), CTX)
    assert {strategy.lr_at(s, 999) for s in range(5)} == {0.2}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warmup_steps": 3}, "needs lr_scaling = 'linear'"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"momentum": 1.0}, "momentum must be in [0, 1)"),
    ],
)
def test_strategy_config_rejects_bad_values(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RingAllReduce.Config(**options)


@pytest.mark.parametrize(("value", "chosen"), [(True, "all"), (False, "")])
def test_a_boolean_recompute_from_an_older_config_is_taken_as_all_or_none(value: bool, chosen: str) -> None:
    from fedge.plugins.train.base import strategy_config

    for name in ("pipeline", "allreduce"):
        assert strategy_config(resolve_strategy(name), {"recompute": value}, name).recompute == chosen


def test_parameter_server_world_size_rules() -> None:
    cfg = ParameterServer.Config(num_servers=2)
    with pytest.raises(ConfigError, match="needs at least 3 processes"):
        ParameterServer.check_world_size(cfg, 2, 24)
    with pytest.raises(ConfigError, match="over 3 workers"):
        ParameterServer.check_world_size(cfg, 5, 32)
    ParameterServer.check_world_size(cfg, 5, 33)


def test_batch_order_is_an_epoch_permutation_cut_into_batches() -> None:
    order = BatchOrder(10, 3, seed=1)

    epoch0 = torch.cat([order.indices(s) for s in range(3)])
    again = BatchOrder(10, 3, seed=1).indices(1)

    assert len(set(epoch0.tolist())) == 9  # 3 disjoint batches, last partial batch dropped
    assert torch.equal(again, order.indices(1))
    assert not torch.equal(order.indices(3), order.indices(0))  # epoch 1 is reshuffled


def test_batch_larger_than_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="larger than the training set"):
        BatchOrder(10, 11, seed=0)


def test_checkpoint_pointer_names_complete_checkpoints_and_prunes(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        checkpoint.save_rank(tmp_path, step, 0, {"step": step, "rng": checkpoint.rng_state()})
        checkpoint.write_latest(tmp_path, {"step": step, "world_size": 1}, keep=2)

    assert checkpoint.latest(tmp_path)["step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]
    assert checkpoint.load_rank(tmp_path, 6, 0)["step"] == 6
    with pytest.raises(DataError, match="missing"):
        checkpoint.load_rank(tmp_path, 6, 1)


def test_corrupt_checkpoint_pointer_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(DataError, match="not a fedge checkpoint pointer"):
        checkpoint.latest(tmp_path)


def test_rng_state_round_trips() -> None:
    state = checkpoint.rng_state()
    first = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_torchrun_command_standalone_and_multinode() -> None:
    local = torchrun_command(TrainConfig(nproc=2, max_restarts=1), "m", ["RUN"])
    multi = torchrun_command(TrainConfig(nproc=4, nnodes="1:3", rdzv_endpoint="node0:29400", rdzv_timeout_s=30), "m", ["RUN"])

    assert local[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in local and local[-3:] == ["--module", "m", "RUN"]
    assert local[local.index("--max-restarts") + 1] == "1"
    assert multi[multi.index("--nnodes") + 1] == "1:3"
    assert multi[multi.index("--rdzv-endpoint") + 1] == "node0:29400"
    assert multi[multi.index("--rdzv-conf") + 1] == "join_timeout=60,read_timeout=30,last_call_timeout=30"


def test_torchrun_command_passes_the_last_call_of_an_elastic_job() -> None:
    fixed = torchrun_command(TrainConfig(nnodes="2", rdzv_endpoint="h:1", rdzv_timeout_s=60, rdzv_last_call_s=5), "m", ["R"])
    elastic = torchrun_command(TrainConfig(nnodes="1:2", rdzv_endpoint="h:1", rdzv_last_call_s=0.5), "m", ["R", "TAG"])

    assert fixed[fixed.index("--rdzv-conf") + 1] == "join_timeout=60,read_timeout=60,last_call_timeout=5"
    assert elastic[elastic.index("--rdzv-conf") + 1] == "join_timeout=61,read_timeout=60,last_call_timeout=1"
    assert elastic[-4:] == ["--module", "m", "R", "TAG"]


_TORCHRUN_ROOT_CAUSE = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
======================================================
fedge.plugins.train.trainer FAILED
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-23_14:23:18
  host      : localhost
  rank      : 1 (local_rank: 0)
  exitcode  : -9 (pid: 17736)  (SIGKILL)
  error_file: <N/A>
"""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (_TORCHRUN_ROOT_CAUSE, "rank 1 was killed by SIGKILL"),
        (_TORCHRUN_ROOT_CAUSE.replace("-9 (pid", "2 (pid"), "rank 1 exited with code 2"),
        ("raise RendezvousTimeoutError", "the rendezvous timed out before enough nodes joined (--nnodes 2, --rdzv-timeout 60s)"),
        ("RendezvousConnectionError: ...", "cannot reach the rendezvous store at h:1: the node at that address stopped"),
        ("", "a worker failed"),
    ],
)
def test_log_reason_names_the_cause(text: str, reason: str) -> None:
    assert reason in _log_reason(text, TrainConfig(nnodes="2", rdzv_endpoint="h:1"))


def test_a_lost_peer_is_one_line_with_exit_code_3() -> None:
    gloo = RuntimeError(
        "Got the following error when running the callback: RuntimeError: [gloo/transport/tcp/pair.cc:553] "
        "Connection closed by peer [127.0.0.1]:21920. This is typically caused by a remote worker crashing.\n\nAt:\n  x.py(39)"
    )

    code, line = _describe_failure("0", gloo)
    other_code, other_line = _describe_failure("2", ValueError("bad\nvalue"))

    assert code == 3 and "\n" not in line
    assert line.startswith("rank 0 lost contact with another rank (Connection closed by peer): ")
    assert (other_code, other_line) == (70, "rank 2 failed: ValueError: bad")


@pytest.mark.parametrize(("text", "size"), [("4KB", 4096), ("64MB", 64 << 20), ("1.5KB", 1536), ("8", 8)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["3", "lots", "0KB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_train_config_validation() -> None:
    assert parse_nnodes("2:4") == (2, 4)
    with pytest.raises(ValueError, match="HOST:PORT"):
        TrainConfig(rdzv_endpoint="nohost")
    with pytest.raises(ValueError, match="RANK:STEP"):
        TrainConfig(fault_at="1")
    with pytest.raises(ValueError, match="nnodes 1:2 spans several machines and needs --rdzv-endpoint"):
        TrainConfig(nnodes="1:2")


def test_resolve_strategy_lists_valid_names() -> None:
    with pytest.raises(Exception, match="valid: .*allreduce.*parameter-server.*ring-allreduce.*tree-allreduce"):
        resolve_strategy("nope")
    assert resolve_strategy("ring-allreduce") is RingAllReduce


def test_allreduce_buckets_in_reverse_order_with_small_first_bucket() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 10))
    strategy = AllReduce(AllReduce.Config(bucket_mb=0.3, first_bucket_mb=0.01), CTX)

    strategy.setup(model)

    buckets = [[id(p) for p in b.params] for b in strategy.buckets]
    params = [id(p) for p in model.parameters()]
    assert [i for b in buckets for i in b] == params[::-1]
    assert len(buckets[0]) == 2  # the last layer alone (10 x 256 + 10 floats) fits the small first bucket
    assert all(p.grad.data_ptr() >= b.flat.data_ptr() for b in strategy.buckets for p in b.params)
    strategy.close()
