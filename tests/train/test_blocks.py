"""Freezing schedules and recomputation choices: parsing, and what they do to one model in one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedge.errors import ConfigError
from fedge.plugins.models import build_model
from fedge.plugins.train.blocks import BlockControl, FreezeSchedule, parse_freeze, parse_recompute


@pytest.mark.parametrize(
    ("spec", "schedule", "frozen_by_step"),
    [
        ("", FreezeSchedule(), [0, 0, 0, 0, 0, 0]),
        ("first:2", FreezeSchedule("first", 2, 0), [2, 2, 2, 2, 2, 2]),
        ("first:1@3", FreezeSchedule("first", 1, 3), [0, 0, 0, 1, 1, 1]),
        ("progressive:2", FreezeSchedule("progressive", 2, 0), [1, 1, 2, 2, 3, 3]),
        ("Progressive:1@2", FreezeSchedule("progressive", 1, 2), [0, 0, 1, 2, 3, 3]),  # never the last of 4
    ],
)
def test_freeze_schedules(spec: str, schedule: FreezeSchedule, frozen_by_step: list[int]) -> None:
    assert parse_freeze(spec) == schedule
    assert [schedule.num_frozen(s, 4) for s in range(6)] == frozen_by_step


@pytest.mark.parametrize("spec", ["first", "first:0", "first:x@2", "progressive:0", "last:1", "first:1@-2"])
def test_bad_freeze_specs_say_what_is_expected(spec: str) -> None:
    with pytest.raises(ValueError, match="freeze"):
        parse_freeze(spec)


def test_recompute_choices() -> None:
    assert parse_recompute("") == frozenset() == parse_recompute("false")
    assert parse_recompute("all") == "all" == parse_recompute("TRUE")
    assert parse_recompute("0, 2-4") == frozenset({0, 2, 3, 4})
    for bad in ("x", "3-1", "1,,2"):
        with pytest.raises(ValueError, match="recompute must be"):
            parse_recompute(bad)


def _mlp() -> torch.nn.Module:
    return build_model("mlp", {"hidden": [32, 16]}, input_shape=(1, 8, 8), num_classes=10)


def test_a_frozen_block_gets_no_gradient_and_keeps_no_graph() -> None:
    # Prepare
    model = _mlp()
    control = BlockControl(model, freeze="first:1@1", recompute="")
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    # Execute: step 0 trains everything, step 1 freezes block 0
    assert not control.update(0)
    F.cross_entropy(model(x), y).backward()
    assert model[1].weight.grad is not None
    assert control.update(1) and not control.update(2)
    out = model[1](model[0](x.requires_grad_(True)))  # an input that needs grad: only no_grad gives no graph
    # Assert
    assert not model[1].weight.requires_grad and model[1].weight.grad is None
    assert out.grad_fn is None  # the frozen prefix ran under no_grad
    assert control.frozen_parameters() == [model[1].weight, model[1].bias]


def _count_forwards(model: torch.nn.Module) -> dict[str, int]:
    """How often each block's own forward runs (wrapped before BlockControl wraps it, as recompute calls it)."""
    calls: dict[str, int] = {}
    for name, block in model.named_children():
        if any(True for _ in block.parameters()):
            calls[name] = 0

            def counted(*args, _name=name, _forward=block.forward, **kwargs):
                calls[_name] += 1
                return _forward(*args, **kwargs)

            block.forward = counted
    return calls


def test_recompute_gives_the_same_gradients_as_without_and_runs_the_chosen_forwards_twice() -> None:
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    grads = []
    for spec, twice in (("", set()), ("all", {"1", "3", "5"}), ("1", {"3"})):
        model = _mlp()
        calls = _count_forwards(model)
        control = BlockControl(model, freeze="", recompute=spec)
        loss = F.cross_entropy(model(x), y)
        assert set(calls.values()) == {1}  # the forward pass runs each block once
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert control.recompute == ({0, 1, 2} if spec == "all" else {1} if spec else set())
        assert calls == {name: 2 if name in twice else 1 for name in ("1", "3", "5")}  # backward redid these
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("freeze", "recompute", "message"),
    [
        ("first:3", "", "would freeze all 3 blocks of the model (1, 3, 5); freeze at most 2"),
        ("", "3", "recompute '3' names block 3, but the model has 3 blocks (0-2: 1, 3, 5)"),
    ],
)
def test_choices_that_do_not_fit_the_model_are_refused(freeze: str, recompute: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BlockControl(_mlp(), freeze=freeze, recompute=recompute)
