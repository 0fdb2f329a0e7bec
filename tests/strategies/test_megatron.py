"""Megatron strategy: parity with single-process training, collectives per block, bad layouts."""

from __future__ import annotations

import pytest
import torch

from fedge.errors import ConfigError
from fedge.plugins.strategies.megatron import Megatron

STEPS = 3


@pytest.mark.multiproc
def test_vocab_parallel_embedding_matches_single_process(run_dist, parity):
    options = {"vocab_size": 16}
    reference = parity.train_single(STEPS, options=options)
    results = run_dist(parity.train_strategy, 2, Megatron, {"tp": 2, "vocab_parallel": True}, STEPS, None, options)
    parity.assert_same_training(results, reference)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("world_size", "config", "resume_at"),
    [
        (2, {"tp": 2}, None),
        (4, {"tp": 2, "dp": 2}, 2),
        (4, {"tp": 2, "pp": 2, "microbatches": 2, "schedule": "gpipe"}, None),
    ],
    ids=["tp2", "tp2xdp2-resumed", "tp2xpp2"],
)
def test_matches_single_process(run_dist, parity, world_size, config, resume_at):
    # Prepare
    reference = parity.train_single(STEPS)
    # Execute
    results = run_dist(parity.train_strategy, world_size, Megatron, config, STEPS, resume_at)
    # Assert
    parity.assert_same_training(results, reference)


def _count_allreduces(rank, world_size, parity):
    """Run the strategy's sharded model once under torch.profiler; count gloo all-reduces in each phase."""
    from fedge.plugins.train.base import DistContext

    ctx = DistContext(rank=rank, world_size=world_size, local_rank=rank, backend="gloo", device=torch.device("cpu"))
    strategy = Megatron(Megatron.Config(tp=2), ctx)
    strategy.setup(parity.make_model())
    block = strategy.model[1]
    x = torch.randn(4, 8, 32, requires_grad=True)
    counts = {}
    for name, fn in [("attn", block.attn), ("mlp", block.mlp), ("block", block)]:
        with torch.profiler.profile() as fwd:
            out = fn(x)
        with torch.profiler.profile() as bwd:
            out.sum().backward()
        counts[name] = [sum(e.name == "gloo:all_reduce" for e in p.events()) for p in (fwd, bwd)]
    with torch.profiler.profile() as whole:
        strategy.model(torch.randn(4, 1, 8, 8)).sum().backward()
    counts["model"] = [sum(e.name == "gloo:all_reduce" for e in whole.events())]
    return counts


@pytest.mark.multiproc
def test_one_allreduce_forward_and_one_backward_per_sublayer(run_dist, parity):
    results = run_dist(_count_allreduces, 2, parity)
    for counts in results:
        assert counts["attn"] == [1, 1]
        assert counts["mlp"] == [1, 1]
        assert counts["block"] == [2, 2]
        assert counts["model"] == [4 * 2]  # 2 blocks x (2 forward + 2 backward)


@pytest.mark.parametrize(
    ("config", "world_size", "batch", "message"),
    [
        ({"tp": 2, "dp": 3}, 4, 12, "dp=3 x tp=2 x pp=1 = 6 does not equal the world size 4"),
        ({"tp": 3}, 4, 12, "tp=3 x pp=1 = 3 does not divide the world size 4"),
        ({"tp": 2, "dp": 2}, 4, 15, "batch size 15 does not split over dp=2"),
        ({"tp": 1, "pp": 2, "microbatches": 3}, 4, 16, "microbatches=3 does not divide the 8 rows"),
    ],
)
def test_bad_layouts_are_rejected_before_launch(config, world_size, batch, message):
    with pytest.raises(ConfigError) as err:
        Megatron.check_world_size(Megatron.Config(**config), world_size, batch)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
