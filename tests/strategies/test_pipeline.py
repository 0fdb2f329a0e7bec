"""Pipeline strategy: parity with single-process training, balanced splits, bad layouts."""

from __future__ import annotations

import pytest
from torch import nn

from fedge.errors import ConfigError
from fedge.plugins.strategies._pipeline_stage import balanced_split, resolve_split
from fedge.plugins.strategies.pipeline import Pipeline

STEPS = 3


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("config", "resume_at"),
    [
        ({"stages": 2, "microbatches": 4, "schedule": "gpipe"}, 2),
        ({"stages": 2, "microbatches": 4, "schedule": "1f1b", "recompute": True, "balance": "time"}, None),
    ],
    ids=["gpipe-resumed", "1f1b-recompute-timebalance"],
)
def test_two_stages_match_single_process(run_dist, parity, config, resume_at):
    # Prepare
    reference = parity.train_single(STEPS)
    # Execute
    results = run_dist(parity.train_strategy, 2, Pipeline, config, STEPS, resume_at)
    # Assert
    parity.assert_same_training(results, reference)
    metrics = results[0][2]
    assert metrics["bubble_formula"] == pytest.approx(1 / 5)
    assert 0.0 <= metrics["bubble"] <= 1.0


@pytest.mark.multiproc
def test_two_stages_times_two_replicas_match_single_process(run_dist, parity):
    reference = parity.train_single(STEPS)
    results = run_dist(parity.train_strategy, 4, Pipeline, {"stages": 2, "microbatches": 2}, STEPS)  # dp=2 inferred
    parity.assert_same_training(results, reference)


def test_balanced_split_minimises_the_costliest_stage():
    assert balanced_split([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_split([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [1, 8]
    assert balanced_split([1, 5, 5, 1], 3) in ([2, 1, 1], [1, 1, 2])
    assert sum(balanced_split([3, 1, 4, 1, 5, 9, 2, 6], 3)) == 8


def test_more_stages_than_layers_is_one_clear_error():
    layers = [nn.Linear(2, 2) for _ in range(3)]
    with pytest.raises(ConfigError, match="stages=4 is more than the model's 3 top-level layers"):
        resolve_split(layers, num_stages=4, split=(), balance="params", sample=None)


def test_explicit_split_must_fit_the_model():
    layers = [nn.Linear(2, 2) for _ in range(4)]
    assert resolve_split(layers, num_stages=2, split=(1, 3), balance="params", sample=None) == [1, 3]
    with pytest.raises(ConfigError, match="sum to the model's 4 layers"):
        resolve_split(layers, num_stages=2, split=(1, 2), balance="params", sample=None)


@pytest.mark.parametrize(
    ("config", "world_size", "batch", "message"),
    [
        ({"stages": 2, "microbatches": 3}, 2, 16, "microbatches=3 does not divide the 16 rows"),
        ({"stages": 3, "dp": 1}, 4, 16, "stages=3 x dp=1 = 3 does not equal the 4 processes (--nproc x nodes)"),
        ({"dp": 3}, 4, 12, "dp=3 does not divide the 4 processes (--nproc x nodes)"),
        ({"stages": 3}, 4, 12, "stages=3 does not divide the 4 processes (--nproc x nodes)"),
        ({"split": (1, 1, 1)}, 4, 12, "split=1,1,1 (3 stages) does not divide the 4 processes"),
        ({"stages": 4}, 2, 16, "stages=4 needs at least 4 processes (one per stage), got 2 processes"),
    ],
)
def test_bad_layouts_are_rejected_before_launch(config, world_size, batch, message):
    with pytest.raises(ConfigError) as err:
        Pipeline.check_world_size(Pipeline.Config(**config), world_size, batch)
    assert message in str(err.value)
    # Only what a pipeline user sets: no tensor parallelism, no pp they never typed.
    assert "tp=" not in str(err.value) and "pp=" not in str(err.value)
    assert "\n" not in str(err.value)
