"""Models: shapes, determinism, save/load round trip, training on digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedge.errors import ConfigError, DataError
from fedge.plugins.data import load_dataset
from fedge.plugins.models import build_model, load_model, save_model
from fedge.plugins.train.single_process import evaluate, train_epochs


@pytest.mark.parametrize("name", ["mlp", "cnn", "tiny-gpt"])
def test_models_build_and_run(name: str) -> None:
    model = build_model(name, input_shape=(1, 8, 8), num_classes=10)
    out = model(torch.zeros(3, 1, 8, 8))
    assert out.shape == (3, 10)
    again = build_model(name, input_shape=(1, 8, 8), num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # pipeline strategies split on children: their composition is the forward
    x = torch.randn(2, 1, 8, 8)
    h = x
    for child in model.children():
        h = child(h)
    assert torch.allclose(h, model(x))


def test_tiny_gpt_token_inputs_and_dtype() -> None:
    model = build_model("tiny-gpt", {"vocab_size": 17, "num_layers": 2, "dtype": "float64"}, input_shape=(16,), num_classes=4)
    assert model(torch.randint(0, 17, (2, 16))).dtype == torch.float64


def test_bad_model_config() -> None:
    with pytest.raises(ConfigError, match="d_model"):
        build_model("tiny-gpt", {"d_model": 30, "num_heads": 4}, input_shape=(1, 8, 8), num_classes=10)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = build_model("cnn", {"hidden": 32}, input_shape=(1, 8, 8), num_classes=10)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot load weights"):
        load_model(tmp_path)
    with pytest.raises(DataError, match="no model weights"):
        load_model(tmp_path / "elsewhere")


def test_cnn_learns_digits() -> None:
    data = load_dataset("digits")
    model = build_model("cnn", input_shape=data.input_shape, num_classes=data.num_classes)
    train_epochs(model, data.x_train, data.y_train, epochs=5, batch_size=32, lr=0.05)
    _, acc = evaluate(model, data.x_test, data.y_test)
    assert acc > 0.9


def test_build_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)

    first = build_model("mlp", {"seed": 7}, input_shape=(64,), num_classes=10)
    drawn = torch.rand(3)
    second = build_model("mlp", {"seed": 7}, input_shape=(64,), num_classes=10)

    torch.testing.assert_close(drawn, expected)  # the caller's stream did not move
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # the seed alone decides the weights
