"""A Keras model (the other source `fedge edge export` takes) through TensorFlow's TFLite converter, int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.cli.app import main

pytestmark = [pytest.mark.edge, pytest.mark.slow]


def test_keras_cnn_exports_to_int8_and_both_runtimes_agree(digits, tmp_path: Path) -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    # Prepare: a small channels-last CNN trained on digits, saved as .keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.moveaxis(digits.x_train, 1, -1), digits.y_train, epochs=8, batch_size=32, verbose=0)
    model.save(tmp_path / "cnn.keras")

    # Execute
    code = main(
        [
            "edge",
            "export",
            str(tmp_path / "cnn.keras"),
            "--quantize",
            "int8",
            "--target",
            "rpi-pico",
            "--out",
            str(tmp_path / "out"),
        ]
    )

    # Assert
    report = json.loads((tmp_path / "out" / "edge-report.json").read_text())
    assert code == 0
    assert report["source_kind"] == "keras" and report["input"]["shape"] == [1, 8, 8, 1]
    assert report["accuracy_source"] > 0.5
    assert report["accuracy_source"] - report["accuracy_exported"] <= 0.01
    assert report["runtimes"]["agreed"] and report["runtimes"]["agreement"]["max_abs_diff"] <= 1
    assert report["fits"] is True
