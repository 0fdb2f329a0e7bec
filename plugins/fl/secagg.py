"""Secure aggregation: Flower's SecAgg+ protocol under fedge's Message-API round loop.

Flower 1.39 has SecAgg+ only on its legacy workflow path (``flwr.server.workflow.SecAggPlusWorkflow`` with
the client mod ``flwr.client.mod.secaggplus_mod``). :func:`secure_round` runs that workflow's four stages
(setup, share keys, collect masked vectors, unmask) for one round of fedge's loop: a small legacy-strategy
bridge hands it the train messages the aggregator's (Message-API) strategy configured, and hands the
strategy back only what the protocol reveals, the weighted mean of the updates, as every client's reply.
The server never holds an individual update: it receives masked vectors, and their unmasked sum.

On the client, :func:`client_mod` runs ``secaggplus_mod`` and converts between its legacy fit messages and
fedge's ``train`` (arrays + config in, arrays + metrics out). Aggregators whose server step starts from the
mean combine with it (:data:`fedge.plugins.fl.privacy.MEAN_AGGREGATORS`); those that need every update
(median, trimmed mean, Krum, Bulyan) are refused before a run starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.errors import RuntimeFailure

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

    from fedge.plugins.fl.liveness import RoundReplies
    from fedge.plugins.fl.privacy import PrivacyConfig

__all__ = ["client_mod", "quantization_error", "secure_round"]

logger = logging.getLogger(__name__)

_NAMES_KEY = "secagg-array-names"
_STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


def quantization_error(p: PrivacyConfig) -> float:
    """Largest difference per weight between SecAgg+'s aggregate and the exact mean (rounding to the grid)."""
    return float(2.0 * p.secagg_clipping_range / p.secagg_quantization_range)


def _bridge_class() -> type:
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy as LegacyStrategy

    class _Bridge(LegacyStrategy):
        """The legacy strategy SecAggPlusWorkflow drives: it turns fedge's train messages into fit instructions and
        the unmasked result into train replies."""

        def __init__(self, messages: list[Message], grid: Grid) -> None:
            self.messages, self.grid = messages, grid
            first = messages[0].content.array_records["arrays"] if messages else ArrayRecord()
            self.names = list(first.keys())
            self.dtypes = [v.numpy().dtype for v in first.values()]
            self.replies: list[Message] = []

        def initialize_parameters(self, client_manager: Any) -> None:
            return None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            out = []
            for msg in self.messages:
                config = {**msg.content.config_records["config"], _NAMES_KEY: json.dumps(self.names)}
                params = compat.arrayrecord_to_parameters(msg.content.array_records["arrays"], keep_input=True)
                proxy = GridClientProxy(msg.metadata.dst_node_id, self.grid, 0)
                out.append((proxy, FitIns(parameters=params, config=config)))  # type: ignore[arg-type]
            return out

        def aggregate_fit(
            self, server_round: int, results: list[Any], failures: list[Any]
        ) -> tuple[None, dict[str, Any]]:
            # Every result carries the same unmasked weighted mean (the workflow set it), never a client's own;
            # fedge's loop hands these replies to the strategy's aggregate_train, as it would plain ones.
            for proxy, fitres in results:
                arrays = [
                    np.asarray(a, dtype=d)
                    for a, d in zip(parameters_to_ndarrays(fitres.parameters), self.dtypes, strict=True)
                ]
                metrics = MetricRecord({**fitres.metrics, "num-examples": fitres.num_examples})
                content = RecordDict({"arrays": ArrayRecord(dict(zip(self.names, map(Array, arrays), strict=True))),
                                      "metrics": metrics})  # fmt: skip
                self.replies.append(Message(content, dst_node_id=proxy.node_id, message_type=MessageType.TRAIN))
            return None, {}  # the workflow keeps no model of its own

        def configure_evaluate(self, *args: Any) -> list[Any]:
            return []

        def aggregate_evaluate(self, *args: Any) -> tuple[None, dict[str, Any]]:
            return None, {}

        def evaluate(self, *args: Any) -> None:
            return None

    return _Bridge


def secure_round(
    grid: Grid, server_round: int, messages: list[Message], p: PrivacyConfig, *, timeout_s: float
) -> RoundReplies:
    """One round of SecAgg+ over ``messages`` (the strategy's ``configure_train``).

    Returns:
        One reply per client that stayed in the protocol, each holding the same unmasked weighted mean of their
        updates (and the client's own train metrics); the lost clients as ``timed_out``.

    Raises:
        RuntimeFailure: too many clients were lost mid-protocol for the masks to be removed (fewer live neighbours
            than the reconstruction threshold), or fewer than 2 clients were sampled.
    """
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from fedge.plugins.fl.liveness import RoundReplies

    bridge = _bridge_class()(messages, grid)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=bridge
    )
    if messages:
        context.state.array_records[MAIN_PARAMS_RECORD] = messages[0].content.array_records["arrays"]
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    workflow = SecAggPlusWorkflow(
        p.secagg_num_shares, p.secagg_reconstruction_threshold, max_weight=p.secagg_max_weight,
        clipping_range=p.secagg_clipping_range, quantization_range=p.secagg_quantization_range,
        timeout=p.secagg_timeout_s or timeout_s,
    )  # fmt: skip
    state = WorkflowState()
    steps = (
        workflow.setup_stage,
        workflow.share_keys_stage,
        workflow.collect_masked_vectors_stage,
        workflow.unmask_stage,
    )
    for name, step in zip(_STAGES, steps, strict=True):
        if not step(grid, context, state):
            raise RuntimeFailure(
                _failure_line(server_round, name, len(messages), len(state.active_node_ids), state.threshold)
            )
        logger.info(
            "round %d: SecAgg+ %s stage: %d of %d clients",
            server_round,
            name,
            len(state.active_node_ids),
            len(messages),
        )
    lost = sorted({m.metadata.dst_node_id for m in messages} - state.active_node_ids)
    return RoundReplies(replies=bridge.replies, timed_out=lost, offline=[], quarantined=[])


def _failure_line(server_round: int, stage: str, sampled: int, alive: int, threshold: int) -> str:
    if sampled < 2:
        return f"round {server_round}: secure aggregation needs at least 2 clients, {sampled} sampled"
    return (
        f"round {server_round}: secure aggregation failed at its {stage} stage: {alive} of {sampled} clients "
        f"still answered, below the reconstruction threshold of {threshold}, so the masks cannot be removed; "
        f"lower secagg_reconstruction_threshold to tolerate more lost clients"
    )


def client_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The ClientApp mod: SecAgg+ messages go through Flower's ``secaggplus_mod``, others straight on."""
    from flwr.app import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, _legacy_fit(call_next))


def _legacy_fit(call_next: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """fedge's train behind ``secaggplus_mod``, which sends legacy fit instructions and expects a fit result."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fedge.plugins.fl.privacy import WEIGHT_KEY

    def fit(msg: Message, ctxt: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        names = json.loads(str(config.pop(_NAMES_KEY)))
        arrays = dict(zip(names, (Array(a) for a in parameters_to_ndarrays(fitins.parameters)), strict=True))
        content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)})  # type: ignore[arg-type]
        inner = Message(content=content, metadata=msg.metadata)  # type: ignore[call-overload]  # Flower's own way
        reply = call_next(inner, ctxt)
        if reply.has_error():
            return reply
        new = reply.content.array_records["arrays"]
        metrics = dict(reply.content.metric_records["metrics"])
        # 1 under central DP: SecAgg+'s mean is then unweighted, as the DP accounting assumes
        weight = metrics.get(WEIGHT_KEY, metrics.get("num-examples", 1))
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([new[k].numpy() for k in names]),
            num_examples=int(weight),  # type: ignore[arg-type]
            metrics=metrics,  # type: ignore[arg-type]
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    return fit
