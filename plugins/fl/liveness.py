"""Which sampled nodes a round waits for, on top of Flower's own node liveness.

Flower 1.39's SuperLink lists a node in ``grid.get_node_ids()`` while its heartbeats arrive: a SuperNode sends
one about every 24 s (interval 30 s, hard-coded in ``flwr.client.grpc_rere_client.connection``; no flag or
environment variable changes it) and is offline once 2 x 30 s pass without one, so a killed node stays listed
for 36-60 s. A message sent to it meanwhile gets no reply; once Flower marks the node offline (or it is
unregistered), pulling the reply returns an error with ``ErrorCode.NODE_UNAVAILABLE`` at once.

:class:`NodeQuarantine` adds one rule: a node that did not answer in a round (no reply by the deadline, or
Flower reported it unavailable) is quarantined. It stays sampleable and is still sent each round's message,
but the round no longer waits for it: the round ends once every other sampled node has answered. A reply
from the node itself (not an error the SuperLink made up), in time or late to an earlier round's message,
releases it. If every sampled node is quarantined,
the round waits for all of them as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.common.constant import ErrorCode

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp import Grid

__all__ = ["NodeQuarantine", "RoundReplies"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RoundReplies:
    """What came back for one round's messages."""

    replies: list[Message]
    """Replies from nodes, client errors included (the caller screens them)."""
    timed_out: list[int]
    """Waited-for nodes that had not replied by the deadline."""
    offline: list[int]
    """Nodes the SuperLink reported unavailable (offline or unregistered)."""
    quarantined: list[int]
    """Quarantined nodes that had not replied when the waited-for ones were done; not waited for."""
    reply_s: dict[int, float] = field(default_factory=dict)
    """Per node that replied: seconds from sending the round's messages to pulling its reply."""


def _is_node_unavailable(msg: Message) -> bool:
    return bool(msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE)


class NodeQuarantine:
    """Nodes a round does not wait for, because they missed a reply; see the module docstring.

    Example::

        quarantine = NodeQuarantine()
        got = quarantine.send_and_receive(grid, messages, timeout_s=120)
        good, rejected = screen_replies(got.replies, reference)
    """

    def __init__(self, *, poll_s: float = 0.1) -> None:
        self._poll_s = poll_s  # Flower's own send_and_receive sleeps 3 s between polls
        self._nodes: set[int] = set()
        self._unanswered: dict[str, int] = {}  # message id of an earlier round -> its node, no reply yet

    @property
    def nodes(self) -> frozenset[int]:
        """The quarantined node ids."""
        return frozenset(self._nodes)

    def send_and_receive(self, grid: Grid, messages: Sequence[Message], *, timeout_s: float) -> RoundReplies:
        """Push ``messages``; pull replies until every waited-for node answered or ``timeout_s`` passed.

        Also pulls replies to earlier rounds' unanswered messages: a late one releases its node (its content is
        stale and is dropped).
        """
        node_of = {mid: m.metadata.dst_node_id for mid, m in zip(grid.push_messages(list(messages)), messages) if mid}
        wait_all = all(n in self._nodes for n in node_of.values())
        pending = set(node_of)
        sent = time.monotonic()
        deadline = sent + timeout_s
        replies: list[Message] = []
        reply_s: dict[int, float] = {}
        offline: list[int] = []
        while True:
            for msg in grid.pull_messages(pending | set(self._unanswered)):
                mid = msg.metadata.reply_to_message_id
                if (late := self._unanswered.pop(mid, None)) is not None:
                    if msg.metadata.src_node_id == late:  # not an error the SuperLink made up (expired, offline)
                        self._release(late, "answered an earlier round late")
                    continue
                if mid not in pending:
                    continue
                pending.discard(mid)
                if _is_node_unavailable(msg):
                    offline.append(node_of[mid])
                    continue
                replies.append(msg)
                reply_s[node_of[mid]] = round(time.monotonic() - sent, 3)
                if msg.metadata.src_node_id == node_of[mid]:
                    self._release(node_of[mid], "answered")
            waiting = [m for m in pending if wait_all or node_of[m] not in self._nodes]
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(self._poll_s)
        timed_out = sorted(node_of[m] for m in waiting)
        skipped = sorted(node_of[m] for m in pending if m not in waiting)
        for mid in pending:
            self._unanswered[mid] = node_of[mid]
        for node in [*timed_out, *offline]:
            if node not in self._nodes:
                logger.warning("node %d did not answer; later rounds do not wait for it until it answers again", node)
            self._nodes.add(node)
        return RoundReplies(replies=replies, timed_out=timed_out, offline=sorted(offline), quarantined=skipped, reply_s=reply_s)

    def _release(self, node: int, why: str) -> None:
        if node in self._nodes:
            self._nodes.discard(node)
            logger.warning("node %d %s; rounds wait for it again", node, why)
