"""Federated clients train on CUDA: the ClientApp's local round (``train_round``) on a node whose torch sees
a GPU gives the CPU's result within float32 rounding (TF32 off), and, where Flower is installed, a whole
``fedge fl run`` finishes with its SuperNodes on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _round_config() -> dict[str, object]:
    from fedge.plugins.data import load_dataset
    from fedge.plugins.models import build_model, model_spec

    data = load_dataset("digits")
    model = build_model("cnn", {}, input_shape=data.input_shape, num_classes=data.num_classes)
    return {
        "model-spec": json.dumps(model_spec(model)), "local-epochs": 1, "batch-size": 16, "lr": 0.05, "seed": 0,
        "server-round": 1, "dataset": "digits", "dataset-options": "{}", "partition": "iid",
        "arrays": {k: v.numpy() for k, v in model.state_dict().items()},
    }


def test_client_round_on_cuda_matches_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedge.plugins.fl.local import node_device, train_round

    # Prepare
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config = _round_config()
    arrays = config.pop("arrays")
    node = {"partition-id": 0, "num-partitions": 4}
    assert node_device(node) == "cuda"  # auto: the GPU when there is one
    # Execute
    on_gpu, m_gpu = train_round(config, node, arrays)
    on_cpu, m_cpu = train_round(config, {**node, "device": "cpu"}, arrays)
    # Assert
    assert m_gpu["num-examples"] == m_cpu["num-examples"]
    assert m_gpu["train-loss"] == pytest.approx(m_cpu["train-loss"], rel=1e-3)
    for key, value in on_cpu.items():
        assert isinstance(on_gpu[key], np.ndarray)
        np.testing.assert_allclose(on_gpu[key], value, rtol=1e-3, atol=1e-4, err_msg=key)


@pytest.mark.multiproc
def test_federation_trains_with_supernodes_on_cuda(tmp_path: Path, fedge_cli) -> None:
    pytest.importorskip("flwr", reason="Flower is not installed on this machine")
    proc = fedge_cli("fl", "run", "--clients", "2", "--rounds", "2", "--local-epochs", "1", "--out", tmp_path / "fl", timeout_s=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads(line) for line in (tmp_path / "fl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[-1]["accuracy"] > 0.3
