"""Every registered exporter honours the ExporterPlugin contract and round-trips a model; exporters are chosen by
name with their options; a third-party exporter (examples/custom_plugin) is used through the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.edge.exporters.base import Artefacts, ExporterPlugin, ExportSource, exporter_registry

pytestmark = pytest.mark.edge

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def small_mlp(digits):
    from torch import nn

    from fedge.plugins.train.single_process import train_epochs

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    train_epochs(model, digits.x_train, digits.y_train, epochs=2, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def worker(conversion_worker):
    return conversion_worker


@pytest.mark.parametrize("name", exporter_registry().names())
def test_every_exporter_round_trips_a_model(name: str, small_mlp, worker, digits) -> None:
    import torch

    # Prepare
    plugin = exporter_registry().get(name)
    source = ExportSource(small_mlp, digits.x_train[:64], worker=worker)

    # Execute
    artefacts = plugin.export(source, plugin.Config())

    # Assert: the contract, then a model that still answers like the source
    assert isinstance(plugin, ExporterPlugin) and dataclasses.is_dataclass(plugin.Config)
    assert isinstance(artefacts, Artefacts) and artefacts.files
    assert all(Path(n).name == n and content for n, content in artefacts.files.items())
    if "model.tflite" in artefacts.files:
        assert artefacts.files["model.tflite"] == artefacts.edge.data
    with torch.no_grad():
        want = small_mlp(torch.as_tensor(digits.x_test[:100])).argmax(1).numpy()
    assert (artefacts.edge(digits.x_test[:100]).argmax(1) == want).mean() >= 0.95


def test_the_same_conversion_is_made_once_per_source(small_mlp, worker, digits) -> None:
    source = ExportSource(small_mlp, digits.x_train[:16], worker=worker)

    first = source.tflite("none")
    again = source.tflite("none")

    assert again is first


def test_exporter_options_and_the_quantize_shortcut_build_its_config() -> None:
    from fedge.edge.convert import Quantization
    from fedge.edge.export_workflow import ExportConfig, choose_exporter

    chosen = choose_exporter(ExportConfig(exporter="c-array", options={"symbol": "g_digits"}, quantize="none"))

    assert chosen.name == "c-array" and chosen.config.symbol == "g_digits"
    assert chosen.config.quantization is Quantization.NONE and chosen.config.calibration_samples == 200


def test_a_third_party_exporter_is_chosen_by_name_from_the_cli(
    example_plugin_site: Path, trained_run: Path, tmp_path: Path
) -> None:
    from fedge.plugins.models import load_model

    # Prepare
    env = {**os.environ, "PYTHONPATH": str(example_plugin_site)}
    out = tmp_path / "weights"

    def fedge(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "fedge"), *args], env=env, capture_output=True, text=True, check=False)

    # Execute
    listed = fedge("plugins", "--kind", "exporter", "--json")
    export = ("edge", "export", str(trained_run), "--exporter", "int8-weights")
    done = fedge(
        *export, "-o", "compressed=false", "--target", "arduino-nano-33-ble-sense", "--out", str(out), "--json"
    )
    refused = fedge(*export, "--quantize", "none", "--out", str(tmp_path / "never"))

    # Assert: listed, exported, verified like a built-in; the weights are the int8 model's
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["int8-weights"]["distribution"] == "fedge-example-plugin"
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["exporter"] == "int8-weights" and report["files"] == ["model.tflite", "weights.npz"]
    assert report["exporter_options"] == {"calibration_samples": 200, "compressed": False}
    assert report["runtimes"]["agreed"] is True and report["fits"] is True
    weights = np.load(out / "weights.npz")
    last = max(k for k in weights if k.endswith(".weight"))
    linear = load_model(trained_run)[-1].weight.detach().numpy()
    dequantized = weights[last].astype(np.float32) * weights[last + "_scale"][:, None]
    assert weights[last].dtype == np.int8 and dequantized.shape == linear.shape
    # Symmetric per-channel int8: within half a step of the float weight.
    assert np.all(np.abs(dequantized - linear) <= weights[last + "_scale"][:, None] / 2 + 1e-6)
    assert refused.returncode == 1 and "has no quantization option" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()
