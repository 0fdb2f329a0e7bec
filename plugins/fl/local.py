"""One client's round of local training on plain data (dicts of numpy arrays in and out).

Used by the ClientApp directly, or by a SuperNode's warm worker (:mod:`.warm_worker`) that keeps torch
imported and the node's data loaded between rounds. torch is imported inside the functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["client_seed", "load_local_data", "node_device", "train_round"]


@lru_cache(maxsize=4)
def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's local training in one round: distinct per client and round, fixed by ``seed``."""
    return seed * 100_003 + server_round * 1_009 + partition_id


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["x_train"], data["y_train"]


def load_local_data(config: Mapping[str, Any], node: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """This node's training data: ``data-path`` (.npz) from the node config, else its partition of ``dataset``."""
    if "data-path" in node:
        return _load_npz(str(node["data-path"]))
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this SuperNode has no data: give it --node-config 'data-path=...' or 'partition-id=I num-partitions=N'"
        )
    dataset, parts = _partitions(
        str(config["dataset"]), str(config["dataset-options"]), str(config["partition"]), int(config["seed"]),
        int(node["num-partitions"]),
    )  # fmt: skip
    idx = parts[int(node["partition-id"])]
    return dataset.x_train[idx], dataset.y_train[idx]


@lru_cache(maxsize=2)
def _partitions(dataset_name: str, options: str, spec: str, seed: int, num_partitions: int) -> tuple[Any, list[np.ndarray]]:
    # Virtual clients (simulation) share a process: the dataset is read and split once per process, and each
    # client takes its index array, so a thousand clients cost one copy of the data, not a thousand.
    from fedge.config import parse_partition
    from fedge.plugins.data import load_dataset, partition

    dataset = load_dataset(dataset_name, json.loads(options))
    return dataset, partition(dataset.y_train, num_partitions, parse_partition(spec, seed=seed))


def node_device(node: Mapping[str, Any]) -> str:
    """Where this node trains: its node config's ``device`` (``cpu``/``cuda``), else CUDA when it has a GPU."""
    import torch

    choice = str(node.get("device", "auto"))
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"node config device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("node config device=cuda, but this node's torch sees no CUDA GPU; use device=cpu")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def train_round(
    config: Mapping[str, Any], node: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train the global model ``arrays`` for ``local-epochs`` on local data.

    Args:
        config: the server's train config (``model-spec``, ``local-epochs``, ``batch-size``, ``lr``, ``seed``,
            ``server-round``, optional ``proximal-mu``).
        node: the SuperNode's node config.
        arrays: the global model's state, by parameter name.

    Returns:
        The new state and metrics ``num-examples``, ``train-loss``, ``compute-s``.
    """
    import torch

    from fedge.plugins.models import build_model
    from fedge.plugins.train.single_process import train_epochs

    torch.set_num_threads(1)
    x, y = load_local_data(config, node)
    spec = json.loads(str(config["model-spec"]))
    model = build_model(
        spec["model"], spec.get("config", {}), input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"]
    )
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    seed = client_seed(int(config["seed"]), int(config["server-round"]), int(node.get("partition-id", 0)))
    start = time.perf_counter()
    loss = train_epochs(
        model,
        x,
        y,
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        seed=seed,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        device=node_device(node),
    )
    metrics = {"num-examples": len(x), "train-loss": float(loss), "compute-s": time.perf_counter() - start}
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, metrics
