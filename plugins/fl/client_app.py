"""fedge's Flower ClientApp: trains the received global model on this SuperNode's data for one round.

Flower starts a fresh ``flwr-clientapp`` process per message, so this module keeps its imports few.
The SuperNode's ``--node-config`` says where its data is (see :func:`.local.load_local_data`: ``data-path``
or ``partition-id`` / ``num-partitions``) and, with ``worker="<socket>"``, which warm worker trains for it
(:mod:`.warm_worker`), so this process need not import torch.

``fault=nan|inf|shape|noise`` makes the node send a corrupted update, and ``fault=crash`` kills its SuperNode
when it is asked to train (robustness tests and demos).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.plugins.fl import privacy, secagg

__all__ = ["app"]

# SecAgg+ first: it turns its legacy fit messages into fedge's train message, which the DP mods then see.
app = ClientApp(mods=[secagg.client_mod, privacy.client_mod])


def _process_age_s() -> float:
    """Seconds since this process started (interpreter start, imports, data loading included)."""
    try:
        with open("/proc/self/stat", encoding="utf-8") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="utf-8") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return float("nan")


def _inject_fault(arrays: dict[str, np.ndarray], fault: str, seed: int) -> dict[str, np.ndarray]:
    name = next(iter(arrays))
    if fault == "nan":
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif fault == "inf":
        arrays[name] = arrays[name].copy()
        arrays[name].flat[0] = np.inf
    elif fault == "shape":
        arrays[name] = arrays[name].reshape(-1)[:-1].copy()
    elif fault == "noise":  # a Byzantine client: large random weights, finite and well-shaped
        rng = np.random.default_rng(seed)
        arrays = {k: rng.normal(0.0, 50.0, v.shape).astype(v.dtype) for k, v in arrays.items()}
    return arrays


def _crash() -> None:
    import psutil

    for parent in psutil.Process().parents():
        if any("flower-supernode" in part for part in parent.cmdline()):
            parent.kill()
            break
    os._exit(1)


def _train(config: dict[str, Any], node: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, float], bool]:
    if worker := str(node.get("worker", "")):
        from fedge.plugins.fl.warm_worker import call_worker

        try:
            new_arrays, metrics = call_worker(worker, {"config": config, "node": node, "arrays": arrays})
            return new_arrays, metrics, True
        except (OSError, EOFError):
            pass  # no warm worker (not started, or gone): train here
    from fedge.plugins.fl.local import train_round

    new_arrays, metrics = train_round(config, node, arrays)
    return new_arrays, metrics, False


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model for ``local-epochs`` on local data; reply with new weights and metrics."""
    from fedge.plugins.fl import profiles

    config, node = dict(msg.content["config"]), dict(context.node_config)
    if str(node.get("fault", "")) == "crash":
        _crash()
    partition_id, server_round = int(node.get("partition-id", 0)), int(config["server-round"])
    profile = profiles.from_train_config(config, partition_id)
    if profiles.dropped_out(profile, seed=int(config["seed"]), partition_id=partition_id, server_round=server_round):
        raise RuntimeError(profiles.DROPPED)  # Flower replies with this error; the server records a dropout
    if profile.local_epochs is not None:
        config["local-epochs"] = profile.local_epochs
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    arrays, metrics, warm = _train(config, node, arrays)
    if profile.slowdown > 1:  # a slower device: the same work, taking slowdown times as long
        time.sleep(float(metrics["compute-s"]) * (profile.slowdown - 1))
        metrics["compute-s"] = float(metrics["compute-s"]) * profile.slowdown
    if fault := str(node.get("fault", "")):
        arrays = _inject_fault(arrays, fault, int(config["server-round"]))
    metrics.update({"process-s": _process_age_s(), "warm-worker": int(warm)})
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
