"""fedge's Flower ServerApp: the round loop, around a Flower strategy chosen by the ``aggregator`` plugin.

It reads everything from one run-config key, ``run-dir``: the run directory whose ``config.toml``
``fedge fl run`` wrote. Per round it asks the strategy for train messages (``configure_train``) over the nodes
Flower lists as online, sends them and collects replies within ``round_timeout_s`` (not waiting for nodes that
missed an earlier reply, :mod:`.liveness`), drops malformed or non-finite updates (:mod:`.guard`),
lets the strategy aggregate the rest (``aggregate_train``), evaluates the global model on the held-out set,
then writes a checkpoint (atomically) and a ``metrics.jsonl`` line. A run directory with checkpoints resumes
from the last one. At the end it writes ``model.pt`` + ``model.json`` and ``result.json``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedge.errors import FedgeError, RuntimeFailure
from fedge.plugins.fl import privacy, secagg
from fedge.plugins.fl.config import FlConfig, load_config
from fedge.plugins.fl.guard import Rejection, screen_replies
from fedge.plugins.fl.liveness import NodeQuarantine
from fedge.rundir import RunDir, atomic_path

__all__ = ["app", "latest_checkpoint", "run_rounds", "strategy_state_file"]

logger = logging.getLogger(__name__)

app = ServerApp()

_POLL_S = 0.1
_CKPT = re.compile(r"^round-(\d+)\.pt$")
LEDGER_FILE = "privacy-ledger.json"
"""The privacy accountant's state (Flower's RdpAccountant.state_dict), rewritten after each round."""


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The last finished round and its checkpoint file, or None."""
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("round-*.pt") if (m := _CKPT.match(p.name))]
    return max(found) if found else None


def strategy_state_file(checkpoint: Path) -> Path:
    """Where the strategy's server-side state (FedAdam moments, FedAvgM momentum) of a round's checkpoint is.

    It sits beside ``round-NNNN.pt``, which stays a plain model ``state_dict`` (loadable as before); the
    ``.pt`` is written after it, so a round's checkpoint exists only once both files do.
    """
    return checkpoint.with_name(checkpoint.stem + ".strategy.npz")


def _save_strategy_state(path: Path, strategy: Any) -> None:
    from fedge.plugins.aggregators import strategy_state

    state = strategy_state(strategy)
    if not state:  # stateless strategy, or no aggregation yet: nothing to restore
        path.unlink(missing_ok=True)  # a stale file of an earlier attempt at this round
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, allow_pickle=False, **state)  # to a file object: given a path, np.savez appends .npz


def _restore_strategy_state(checkpoint: Path, strategy: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    from fedge.plugins.aggregators import load_strategy_state, state_kinds

    path = strategy_state_file(checkpoint)
    if not path.is_file():
        # An older fedge's checkpoint, a round without aggregation, or FedAvgM without momentum: nothing to restore.
        if state_kinds(strategy):
            logger.info("no %s: the strategy's %s start from zero", path.name, ", ".join(state_kinds(strategy)))
        return
    with np.load(path, allow_pickle=False) as data:
        load_strategy_state(strategy, {k: data[k] for k in data.files}, shapes=shapes)
    logger.warning("restored the strategy's server-side state from %s", path.name)


class _NodeSnapshot:
    """The node ids seen at the start of a round: strategies sample from it, and never wait on it."""

    def __init__(self, node_ids: list[int]) -> None:
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def _wait_for_nodes(grid: Grid, required: int, timeout_s: float) -> list[int]:
    # Flower's get_node_ids() lists online nodes only: those whose heartbeats arrive and not unregistered.
    deadline = time.monotonic() + timeout_s
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= required:
            return ids
        if time.monotonic() > deadline:
            if ids:
                logger.warning("only %d of %d clients connected after %.0f s; going on", len(ids), required, timeout_s)
                return ids
            raise RuntimeFailure(f"no client connected within {timeout_s:.0f} s")
        time.sleep(_POLL_S * 5)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def run_rounds(grid: Grid, run: RunDir, cfg: FlConfig) -> dict[str, Any]:
    """The federated round loop; returns the final record written to ``result.json``."""
    import torch

    from fedge.plugins.aggregators import Sampling, build_strategy
    from fedge.plugins.models import build_model, save_model
    from fedge.plugins.training import evaluate

    torch.set_num_threads(1)
    x_test, y_test, meta = _test_data(run, cfg)
    model = build_model(
        cfg.model, cfg.model_options, input_shape=tuple(meta["input_shape"]), num_classes=int(meta["num_classes"])
    )
    start_round = 1
    if (ckpt := latest_checkpoint(run.path)) is not None:
        model.load_state_dict(torch.load(ckpt[1], map_location="cpu", weights_only=True))
        start_round = ckpt[0] + 1
        logger.warning("resuming after round %d from %s", ckpt[0], ckpt[1])
    spec = dict(model.fedge_spec)  # type: ignore[arg-type]
    sampling = Sampling(fraction_train=cfg.fraction_train, min_train_nodes=1)
    strategy = build_strategy(cfg.aggregator, cfg.aggregator_options, sampling)
    strategy, ledger = _privacy(run, cfg, strategy, resumed=ckpt is not None)
    arrays = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in model.state_dict().items()})
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if ckpt is not None:
        _restore_strategy_state(ckpt[1], strategy, reference)
    train_config = {
        "local-epochs": cfg.local_epochs,
        "batch-size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "model-spec": json.dumps(spec),
        "dataset": cfg.dataset,
        "dataset-options": json.dumps(cfg.dataset_options),
        "partition": cfg.partition,
        **privacy.train_config(cfg.privacy),
    }
    done_rounds = {int(r["round"]) for r in run.read_metrics() if "round" in r}
    if start_round > 1 and start_round - 1 not in done_rounds:  # killed between checkpoint and metrics line
        loss, acc = evaluate(model, x_test, y_test)
        record = {"round": start_round - 1, "loss": loss, "accuracy": acc, "num_clients": None, "round_s": None}
        run.append_metrics({**record, **_privacy_metrics(cfg, ledger)})

    quarantine = NodeQuarantine(poll_s=_POLL_S)
    stopped: str | None = None
    last_round = start_round - 1
    for server_round in range(start_round, cfg.rounds + 1):
        if ledger is not None and ledger.would_exceed():
            stopped = f"stopped before round {server_round}: it would spend more than target_epsilon {cfg.privacy.target_epsilon:g}"
            logger.warning("privacy budget: %s", stopped)
            break
        t0 = time.perf_counter()
        if server_round == start_round:  # the clients start cold: wait for them to come up
            node_ids = _wait_for_nodes(grid, cfg.required_clients, cfg.startup_timeout_s)
        else:  # later rounds take the nodes Flower lists as online; one that went away is not waited for
            node_ids = _wait_for_nodes(grid, 1, cfg.round_timeout_s)
        snapshot = _NodeSnapshot(node_ids)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(train_config), snapshot))  # type: ignore[arg-type]
        t_sent = time.perf_counter()
        # The first round also waits for the clients' cold start (processes, imports, data loading).
        reply_timeout = max(cfg.round_timeout_s, cfg.startup_timeout_s) if server_round == start_round else cfg.round_timeout_s
        if cfg.privacy.secagg:  # SecAgg+: every reply holds only the unmasked mean of the updates
            got = secagg.secure_round(grid, server_round, messages, cfg.privacy, timeout_s=reply_timeout)
        else:
            got = quarantine.send_and_receive(grid, messages, timeout_s=reply_timeout)
        t_replies = time.perf_counter()
        good, rejected = screen_replies(got.replies, reference)
        for r in rejected:
            logger.warning("round %d: rejected update from node %d: %s", server_round, r.node_id, r.reason)
        new_arrays = None
        if good:
            metric_values = [next(iter(m.content.metric_records.values())) for m in good]
            new_arrays, _ = strategy.aggregate_train(server_round, good)
        else:
            metric_values = []
        if new_arrays is not None and all(np.isfinite(a.numpy()).all() for a in new_arrays.values()):
            arrays = new_arrays
            if ledger is not None:
                ledger.compose(num_replies=len(good), num_sampled=len(messages))
        elif new_arrays is not None:
            rejected.append(Rejection(0, "aggregate was non-finite; global model kept"))
            logger.warning("round %d: the aggregate was non-finite; the global model is unchanged", server_round)
        model.load_state_dict({k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()})
        loss, acc = evaluate(model, x_test, y_test)
        checkpoint = run.path / "checkpoints" / f"round-{server_round:04d}.pt"
        _save_strategy_state(strategy_state_file(checkpoint), strategy)
        if ledger is not None:  # before the checkpoint: a resumed run never forgets a release
            ledger.save(run.file(LEDGER_FILE))
        with atomic_path(checkpoint) as tmp:  # last: the round's checkpoint is complete once this file exists
            torch.save(model.state_dict(), tmp)
        record = {
            "round": server_round,
            "loss": round(loss, 6),
            "accuracy": round(acc, 6),
            "num_clients": len(good),
            "round_s": round(time.perf_counter() - t0, 3),
            "sampled": len(messages),
            "rejected": len(rejected),
            "timed_out": len(got.timed_out),
            "offline": len(got.offline),
            "quarantined": len(got.quarantined),
            "train_loss": _mean([float(m.get("train-loss", np.nan)) for m in metric_values]),
            "client_compute_s": _mean([float(m.get("compute-s", np.nan)) for m in metric_values]),
            "client_process_s": _mean([float(m.get("process-s", np.nan)) for m in metric_values]),
            "wait_s": round(t_replies - t_sent, 3),
            **_privacy_metrics(cfg, ledger),
        }
        run.append_metrics(record)
        if rejected:
            with open(run.file("rejected.jsonl"), "a", encoding="utf-8") as f:
                for r in rejected:
                    f.write(json.dumps({"round": server_round, **r.to_json()}) + "\n")
        logger.warning("round %d/%d: accuracy %.4f loss %.4f clients %d", server_round, cfg.rounds, acc, loss, len(good))
        last_round = server_round

    save_model(model, run.path, extra={"dataset": cfg.dataset, "dataset_options": dict(cfg.dataset_options)})
    loss, acc = evaluate(model, x_test, y_test)
    result: dict[str, Any] = {"status": "completed", "rounds": last_round, "loss": loss, "accuracy": acc}
    if cfg.privacy.dp != "off":
        result["privacy"] = {**_privacy_metrics(cfg, ledger), **({"stopped": stopped} if stopped else {})}
    return result


def _privacy(run: RunDir, cfg: FlConfig, strategy: Any, *, resumed: bool) -> tuple[Any, privacy.PrivacyLedger | None]:
    """The strategy inside its DP wrapper, and the ledger of (ε, δ) (None when DP is off or ε cannot be told)."""
    num_sampled = max(1, int(cfg.clients * cfg.fraction_train))
    reason = privacy.PrivacyLedger.unaccounted_reason(cfg.privacy, cfg.aggregator, strategy)
    wrapped = privacy.wrap_strategy(strategy, cfg.privacy, num_sampled_clients=num_sampled)
    if cfg.privacy.dp == "off" or reason is not None:
        if reason:
            logger.warning("%s", reason)
        return wrapped, None
    ledger = privacy.PrivacyLedger(cfg.privacy, population_size=cfg.clients)
    if resumed and run.file(LEDGER_FILE).is_file():
        ledger.load(run.file(LEDGER_FILE))
    return wrapped, ledger


def _privacy_metrics(cfg: FlConfig, ledger: privacy.PrivacyLedger | None) -> dict[str, Any]:
    if cfg.privacy.dp == "off":
        return {}
    if ledger is None:  # the accountant's assumptions do not hold: no ε rather than a wrong one
        return {"epsilon": None, "delta": cfg.privacy.delta}
    return ledger.spent()


def _test_data(run: RunDir, cfg: FlConfig) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    test_file = run.file("data") / "test.npz"
    if test_file.is_file():
        with np.load(test_file) as data:
            x, y = data["x_test"], data["y_test"]
            return x, y, {"input_shape": list(x.shape[1:]), "num_classes": int(data["num_classes"])}
    from fedge.plugins.data import load_dataset

    dataset = load_dataset(cfg.dataset, cfg.dataset_options)
    return dataset.x_test, dataset.y_test, {"input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls in the ``flwr-serverapp`` process."""
    run = RunDir(Path(str(context.run_config["run-dir"])))
    try:
        cfg = load_config(run.file("config.toml"))
        result = run_rounds(grid, run, cfg)
    except FedgeError as err:
        run.write_json("result.json", {"status": "failed", "error": str(err)})
        raise
    except Exception as err:
        run.write_json("result.json", {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        run.write_text("server-traceback.txt", traceback.format_exc())
        raise
    run.write_json("result.json", result)
