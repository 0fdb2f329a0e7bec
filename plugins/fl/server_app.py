"""fedge's Flower ServerApp: the round loop, around a Flower strategy chosen by the ``aggregator`` plugin.

It reads everything from one run-config key, ``run-dir``: the run directory whose ``config.toml``
``fedge fl run`` wrote. :class:`ServerLoop` runs each round as named phases: ``configure`` (the strategy's
train messages for the nodes Flower lists as online), ``send_receive`` (replies within ``round_timeout_s``,
not waiting for nodes that missed an earlier reply, :mod:`.liveness`), ``screen`` (malformed or non-finite
updates dropped, :mod:`.guard`), ``aggregate`` (the strategy's ``aggregate_train`` on the rest), ``evaluate``
(the global model on the held-out set), ``checkpoint`` (model and declared strategy state, atomically) and
``record`` (a ``metrics.jsonl`` line). A run directory with checkpoints resumes from the last one. At the end
it writes ``model.pt`` + ``model.json`` and ``result.json``; a failure is recorded with :mod:`fedge.failure`
in ``errors/serverapp.json``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedge.errors import RuntimeFailure
from fedge.failure import record_failure
from fedge.plugins.fl import privacy, secagg
from fedge.plugins.fl.config import FlConfig, load_config
from fedge.plugins.fl.guard import Rejection, screen_replies
from fedge.plugins.fl.liveness import NodeQuarantine, RoundReplies
from fedge.plugins.fl.profiles import DROPPED
from fedge.rundir import RunDir, atomic_path

if TYPE_CHECKING:
    from fedge.plugins.aggregators import Aggregator

__all__ = ["FAILURE_FILE", "STATUS_FILE", "ServerLoop", "app", "app_for", "latest_checkpoint", "run_rounds", "serve", "strategy_state_file"]

logger = logging.getLogger(__name__)

app = ServerApp()

FAILURE_FILE = "errors/serverapp.json"
"""Where the ServerApp records its failure (``fedge.failure``), relative to the run directory."""
STATUS_FILE = "flower/server-status.json"
"""Where the ServerApp says how many clients it waits for (``fedge fl run`` prints it)."""
_POLL_S = 0.1
_CKPT = re.compile(r"^round-(\d+)\.pt$")
LEDGER_FILE = "privacy-ledger.json"
"""The privacy accountant's state (Flower's RdpAccountant.state_dict), rewritten after each round."""


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The last finished round and its checkpoint file, or None."""
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("round-*.pt") if (m := _CKPT.match(p.name))]
    return max(found) if found else None


def strategy_state_file(checkpoint: Path) -> Path:
    """Where the strategy's declared server-side state of a round's checkpoint is.

    It sits beside ``round-NNNN.pt``, which stays a plain model ``state_dict`` (loadable as before); the
    ``.pt`` is written after it, so a round's checkpoint exists only once both files do.
    """
    return checkpoint.with_name(checkpoint.stem + ".strategy.npz")


class _NodeSnapshot:
    """The node ids seen at the start of a round: strategies sample from it, and never wait on it."""

    def __init__(self, node_ids: list[int]) -> None:
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


@dataclass
class _Round:
    """What one round gathered, phase by phase."""

    server_round: int
    started: float = field(default_factory=time.perf_counter)
    messages: list[Message] = field(default_factory=list)
    got: RoundReplies | None = None
    wait_s: float = 0.0
    good: list[Message] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    loss: float = float("nan")
    accuracy: float = float("nan")


class ServerLoop:
    """The federated round loop over a Flower ``Grid``, one method per phase.

    Args:
        grid: Flower's Grid (the ServerApp's), or a stand-in with ``get_node_ids``/``push_messages``/``pull_messages``.
        run: the run directory (``config.toml``, ``data/test.npz``, checkpoints, metrics).
        cfg: the run's settings.
    """

    def __init__(self, grid: Grid, run: RunDir, cfg: FlConfig) -> None:
        import torch

        from fedge.plugins.models import build_model, model_spec

        torch.set_num_threads(1)
        self.grid, self.run, self.cfg = grid, run, cfg
        self.x_test, self.y_test, meta = _test_data(run, cfg)
        self.model = build_model(
            cfg.model, cfg.model_options, input_shape=tuple(meta["input_shape"]), num_classes=int(meta["num_classes"])
        )
        self.start_round = 1
        last = latest_checkpoint(run.path)
        if last is not None:
            self.model.load_state_dict(torch.load(last[1], map_location="cpu", weights_only=True))
            self.start_round = last[0] + 1
            logger.warning("resuming after round %d from %s", last[0], last[1])
        self.reference = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.arrays = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in self.model.state_dict().items()})
        self.aggregator = self._build_aggregator()
        self.ledger = self._privacy_ledger(resumed=last is not None)
        if last is not None:
            self._restore_state(last[1])
        spec = model_spec(self.model)
        assert spec is not None  # built by build_model above
        self.train_config = ConfigRecord(_train_config(cfg, spec))  # type: ignore[arg-type]
        self.quarantine = NodeQuarantine(poll_s=_POLL_S)

    def _build_aggregator(self) -> Aggregator:
        from fedge.plugins.aggregators import Sampling, build_aggregator

        sampling = Sampling(fraction_train=self.cfg.fraction_train, min_train_nodes=1)
        aggregator = build_aggregator(self.cfg.aggregator, self.cfg.aggregator_options, sampling)
        if self.cfg.privacy.dp != "off":  # central DP: Flower's wrapper around the strategy (privacy.py)
            from dataclasses import replace

            wrapped = privacy.wrap_strategy(aggregator.strategy, self.cfg.privacy, num_sampled_clients=self.cfg.num_sampled)
            aggregator = replace(aggregator, strategy=wrapped)
        return aggregator

    # -- privacy (privacy.py, secagg.py) -------------------------------------------------------------
    def _privacy_ledger(self, *, resumed: bool) -> privacy.PrivacyLedger | None:
        """The (ε, δ) ledger; None when DP is off or the accountant's assumptions do not hold (said once)."""
        if self.cfg.privacy.dp == "off":
            return None
        reason = privacy.PrivacyLedger.unaccounted_reason(self.cfg.privacy, self.cfg.aggregator, self.aggregator.strategy)
        if reason is not None:
            logger.warning("%s", reason)
            return None
        ledger = privacy.PrivacyLedger(self.cfg.privacy, population_size=self.cfg.clients)
        if resumed and self.run.file(LEDGER_FILE).is_file():
            ledger.load(self.run.file(LEDGER_FILE))
        return ledger

    def _budget_stop(self, server_round: int) -> str | None:
        """Why the run stops before ``server_round`` (the privacy budget), or None."""
        if self.ledger is None or not self.ledger.would_exceed():
            return None
        why = f"stopped before round {server_round}: it would spend more than target_epsilon {self.cfg.privacy.target_epsilon:g}"
        logger.warning("privacy budget: %s", why)
        return why

    def _privacy_metrics(self) -> dict[str, Any]:
        if self.cfg.privacy.dp == "off":
            return {}
        if self.ledger is None:  # the accountant's assumptions do not hold: no ε rather than a wrong one
            return {"epsilon": None, "delta": self.cfg.privacy.delta}
        return self.ledger.spent()

    # -- the loop ------------------------------------------------------------------------------------
    def run_all(self) -> dict[str, Any]:
        """Run the remaining rounds; returns the final record written to ``result.json``."""
        from fedge.plugins.models import save_model

        self._record_missing_round()
        stopped, last_round = None, self.start_round - 1
        for server_round in range(self.start_round, self.cfg.rounds + 1):
            if stopped := self._budget_stop(server_round):
                break
            this = _Round(server_round)
            this.messages = self.configure(this)
            self.send_receive(this)
            self.screen(this)
            self.aggregate(this)
            self.evaluate(this)
            self.checkpoint(this)
            self.record(this)
            last_round = server_round
        save_model(self.model, self.run.path, extra={"dataset": self.cfg.dataset, "dataset_options": dict(self.cfg.dataset_options)})
        loss, acc = self._evaluate()
        result: dict[str, Any] = {"status": "completed", "rounds": last_round, "loss": loss, "accuracy": acc}
        if self.cfg.privacy.dp != "off":
            result["privacy"] = {**self._privacy_metrics(), **({"stopped": stopped} if stopped else {})}
        return result

    def configure(self, this: _Round) -> list[Message]:
        """The strategy's train messages for the nodes online now (the first round waits for the clients)."""
        if this.server_round == self.start_round:  # the clients start cold: wait for them to come up
            node_ids = self._wait_for_nodes(self.cfg.required_clients, self.cfg.startup_timeout_s)
        else:  # later rounds take the nodes Flower lists as online; one that went away is not waited for
            node_ids = self._wait_for_nodes(1, self.cfg.round_timeout_s)
        snapshot = _NodeSnapshot(node_ids)
        return list(self.aggregator.strategy.configure_train(this.server_round, self.arrays, self.train_config, snapshot))  # type: ignore[arg-type]

    def send_receive(self, this: _Round) -> None:
        """Send the messages and collect replies until all waited-for nodes answered or the deadline passed."""
        timeout = self.cfg.round_timeout_s
        if this.server_round == self.start_round:  # also the clients' cold start (processes, imports, data)
            timeout = max(timeout, self.cfg.startup_timeout_s)
        sent = time.perf_counter()
        if self.cfg.privacy.secagg:  # SecAgg+: every reply holds only the unmasked mean of the updates
            this.got = secagg.secure_round(self.grid, this.server_round, this.messages, self.cfg.privacy, timeout_s=timeout)
        else:
            this.got = self.quarantine.send_and_receive(self.grid, this.messages, timeout_s=timeout)
        this.wait_s = time.perf_counter() - sent

    def screen(self, this: _Round) -> None:
        """Keep the well-formed, finite updates; the rest become rejections."""
        assert this.got is not None
        this.good, rejected = screen_replies(this.got.replies, self.reference)
        # A client that sat the round out (its availability profile) is a dropout, not a bad update.
        this.dropped = [r.node_id for r in rejected if DROPPED in r.reason]
        this.rejected = [r for r in rejected if DROPPED not in r.reason]
        for r in this.rejected:
            logger.warning("round %d: rejected update from node %d: %s", this.server_round, r.node_id, r.reason)

    def aggregate(self, this: _Round) -> None:
        """Let the strategy aggregate the good updates; a non-finite aggregate keeps the previous model."""
        import torch

        new_arrays = self.aggregator.strategy.aggregate_train(this.server_round, this.good)[0] if this.good else None
        if new_arrays is not None and all(np.isfinite(a.numpy()).all() for a in new_arrays.values()):
            self.arrays = new_arrays
            if self.ledger is not None:  # a released aggregate spends privacy
                self.ledger.compose(num_replies=len(this.good), num_sampled=len(this.messages))
        elif new_arrays is not None:
            this.rejected.append(Rejection(0, "aggregate was non-finite; global model kept"))
            logger.warning("round %d: the aggregate was non-finite; the global model is unchanged", this.server_round)
        elif this.good:
            logger.warning("round %d: %s returned no aggregate; the global model is unchanged", this.server_round, self.cfg.aggregator)
        self.model.load_state_dict({k: torch.from_numpy(np.array(v.numpy())) for k, v in self.arrays.items()})

    def evaluate(self, this: _Round) -> None:
        """The global model on the held-out set (centralized evaluation)."""
        this.loss, this.accuracy = self._evaluate()

    def checkpoint(self, this: _Round) -> None:
        """The strategy's declared state, then the model (last: the round's checkpoint exists once it does)."""
        import torch

        path = self.run.path / "checkpoints" / f"round-{this.server_round:04d}.pt"
        state_path, state = strategy_state_file(path), self.aggregator.state_arrays()
        if state:
            with atomic_path(state_path) as tmp, open(tmp, "wb") as f:
                np.savez(f, allow_pickle=False, **state)  # to a file object: given a path, np.savez appends .npz
        else:  # stateless strategy, or no aggregation yet
            state_path.unlink(missing_ok=True)  # a stale file of an earlier attempt at this round
        if self.ledger is not None:  # before the model: a resumed run never forgets a release
            self.ledger.save(self.run.file(LEDGER_FILE))
        with atomic_path(path) as tmp:
            torch.save(self.model.state_dict(), tmp)

    def record(self, this: _Round) -> None:
        """One ``metrics.jsonl`` line (and ``rejected.jsonl`` lines) for the round."""
        got = this.got
        assert got is not None
        metric_values = [next(iter(m.content.metric_records.values())) for m in this.good]
        compute = {int(m.metadata.src_node_id): float(v["compute-s"]) for m, v in zip(this.good, metric_values) if "compute-s" in v}
        record = {
            "round": this.server_round,
            "loss": round(this.loss, 6),
            "accuracy": round(this.accuracy, 6),
            "num_clients": len(this.good),
            "round_s": round(time.perf_counter() - this.started, 3),
            "sampled": len(this.messages),
            "rejected": len(this.rejected),
            "timed_out": len(got.timed_out),
            "offline": len(got.offline),
            "quarantined": len(got.quarantined),
            "train_loss": _mean([float(m.get("train-loss", np.nan)) for m in metric_values]),
            "client_compute_s": _mean([float(m.get("compute-s", np.nan)) for m in metric_values]),
            "client_process_s": _mean([float(m.get("process-s", np.nan)) for m in metric_values]),
            "wait_s": round(this.wait_s, 3),
            "dropped": len(this.dropped),
            "sampled_nodes": sorted(int(m.metadata.dst_node_id) for m in this.messages),
            "answered_nodes": sorted(int(m.metadata.src_node_id) for m in this.good),
            "dropped_nodes": sorted(this.dropped),
            "late_nodes": sorted([*got.timed_out, *got.quarantined]),
            "reply_s": {str(node): got.reply_s[node] for node in sorted(got.reply_s)},
            "compute_s": {str(node): round(compute[node], 3) for node in sorted(compute)},
            **self._privacy_metrics(),
        }
        self.run.append_metrics(record)
        if this.rejected:
            with open(self.run.file("rejected.jsonl"), "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"round": this.server_round, **r.to_json()}) + "\n" for r in this.rejected)
        logger.warning(
            "round %d/%d: accuracy %.4f loss %.4f clients %d",
            this.server_round, self.cfg.rounds, this.accuracy, this.loss, len(this.good),
        )  # fmt: skip

    # -- helpers -------------------------------------------------------------------------------------
    def _evaluate(self) -> tuple[float, float]:
        from fedge.plugins.train.single_process import evaluate

        return evaluate(self.model, self.x_test, self.y_test)

    def _wait_for_nodes(self, required: int, timeout_s: float) -> list[int]:
        # Flower's get_node_ids() lists online nodes only: those whose heartbeats arrive and not unregistered.
        deadline, said = time.monotonic() + timeout_s, -1
        while True:
            ids = list(self.grid.get_node_ids())
            if len(ids) != said:
                said = len(ids)
                status = {"required": required, "connected": len(ids), "waiting": len(ids) < required}
                self.run.write_json(STATUS_FILE, status)
            if len(ids) >= required:
                return ids
            if time.monotonic() > deadline:
                if ids:
                    logger.warning("only %d of %d clients connected after %.0f s; going on", len(ids), required, timeout_s)
                    return ids
                raise RuntimeFailure(f"no client connected within {timeout_s:.0f} s")
            time.sleep(_POLL_S * 5)

    def _restore_state(self, checkpoint: Path) -> None:
        path = strategy_state_file(checkpoint)
        if not path.is_file():
            # An older fedge's checkpoint, a round without aggregation, or a stateless aggregator.
            if self.aggregator.state:
                logger.info("no %s: the strategy's %s start from zero", path.name, ", ".join(self.aggregator.state))
            return
        with np.load(path, allow_pickle=False) as data:
            self.aggregator.load_state({k: data[k] for k in data.files}, shapes=self.reference)
        logger.warning("restored the strategy's server-side state from %s", path.name)

    def _record_missing_round(self) -> None:
        # Killed between a round's checkpoint and its metrics line: record that round from the checkpoint.
        done_rounds = {int(r["round"]) for r in self.run.read_metrics() if "round" in r}
        if self.start_round > 1 and self.start_round - 1 not in done_rounds:
            loss, acc = self._evaluate()
            self.run.append_metrics(
                {"round": self.start_round - 1, "loss": loss, "accuracy": acc, "num_clients": None, "round_s": None,
                 **self._privacy_metrics()}
            )  # fmt: skip


def _train_config(cfg: FlConfig, spec: dict[str, Any]) -> dict[str, Any]:
    # What every ClientApp needs to train (see client_app / local.train_round).
    return {
        "local-epochs": cfg.local_epochs,
        "batch-size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "model-spec": json.dumps(spec),
        "dataset": cfg.dataset,
        "dataset-options": json.dumps(cfg.dataset_options),
        "partition": str(cfg.partition),
        "heterogeneity": cfg.heterogeneity,
        "client-profiles": json.dumps(cfg.client_profiles),
        **privacy.train_config(cfg.privacy),
    }


def run_rounds(grid: Grid, run: RunDir, cfg: FlConfig) -> dict[str, Any]:
    """The federated round loop; returns the final record written to ``result.json``."""
    return ServerLoop(grid, run, cfg).run_all()


def _test_data(run: RunDir, cfg: FlConfig) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    test_file = run.file("data") / "test.npz"
    if test_file.is_file():
        with np.load(test_file) as data:
            x, y = data["x_test"], data["y_test"]
            return x, y, {"input_shape": list(x.shape[1:]), "num_classes": int(data["num_classes"])}
    from fedge.plugins.data import load_dataset

    dataset = load_dataset(cfg.dataset, cfg.dataset_options)
    return dataset.x_test, dataset.y_test, {"input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes}


def serve(grid: Grid, run: RunDir) -> None:
    """Run the rounds of the run in ``run``; write ``result.json``, or record the failure and raise."""
    try:
        result = run_rounds(grid, run, load_config(run.file("config.toml")))
    except Exception as err:
        record_failure(run.file(FAILURE_FILE), err, where="the ServerApp")
        raise
    run.write_json("result.json", result)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls in the ``flwr-serverapp`` process (Deployment Engine)."""
    serve(grid, RunDir(Path(str(context.run_config["run-dir"]))))


def app_for(run_dir: Path) -> ServerApp:
    """The same ServerApp bound to ``run_dir``, for Flower's Simulation Engine (``run_simulation`` passes no
    run config)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, RunDir(run_dir))

    return bound
