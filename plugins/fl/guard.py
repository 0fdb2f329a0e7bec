"""Screening of client replies before any aggregator sees them: errors, missing records, wrong keys or
shapes, NaN/Inf, bad sample counts. A rejected reply never touches the global model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import Message

__all__ = ["Rejection", "check_reply", "screen_replies"]

WEIGHT_KEY = "num-examples"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A client reply that was not aggregated, and why."""

    node_id: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"node_id": self.node_id, "reason": self.reason}


def check_reply(msg: Message, reference: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why ``msg`` must not be aggregated, or None when it is a well-formed, finite model update.

    Args:
        msg: a reply to a train message.
        reference: the global model's array names and shapes.
    """
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    arrays = next(iter(content.array_records.values()))
    if set(arrays.keys()) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays.keys())), sorted(set(arrays.keys()) - set(reference))
        return f"array names differ from the global model (missing {missing}, unexpected {extra})"
    for name, array in arrays.items():
        values = array.numpy()
        if tuple(values.shape) != tuple(reference[name]):
            return f"wrong shape for {name}: expected {tuple(reference[name])}, got {tuple(values.shape)}"
        if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
            return f"non-numeric dtype {values.dtype} for {name}"
        if not np.isfinite(values).all():
            return f"non-finite values (NaN/Inf) in {name}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
        return f"{WEIGHT_KEY} must be a positive number, got {weight!r}"
    return None


def screen_replies(
    replies: Iterable[Message], reference: Mapping[str, tuple[int, ...]]
) -> tuple[list[Message], list[Rejection]]:
    """Split replies into the ones to aggregate and the rejected ones (with reasons)."""
    good, rejected = [], []
    for msg in replies:
        reason = check_reply(msg, reference)
        if reason is None:
            good.append(msg)
        else:
            rejected.append(Rejection(int(msg.metadata.src_node_id), reason))
    return good, rejected
