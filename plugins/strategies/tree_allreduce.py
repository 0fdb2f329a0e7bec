"""Tree all-reduce over point-to-point send/recv: reduce up a binary tree, broadcast back down.

Rank 0 is the root; rank r's children are 2r+1 and 2r+2. A message crosses 2*ceil(log2(W+1)) - 2 links
on its way up and down, against 2(W-1) steps for a ring, so the tree wins when latency, not bandwidth,
bounds the exchange (small gradients, many ranks). Large buffers travel in chunks so the levels work
as a pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from fedge.plugins.strategies._data_parallel import DataParallel
from fedge.plugins.train.base import ParityCase, StrategyConfig
from fedge.registry import plugin

__all__ = ["TreeAllReduce", "tree_all_reduce"]


def tree_all_reduce(flat: Tensor, *, chunk_bytes: int = 1 << 20, scratch: Tensor | None = None) -> Tensor | None:
    """Sum the 1-D contiguous ``flat`` over every rank of the default group, in place.

    Args:
        flat: the buffer; identical length on every rank.
        chunk_bytes: pipeline granularity (one chunk for buffers up to this size).
        scratch: receive buffer of at least ``4 * chunk`` elements to reuse across calls (else allocated).

    Returns:
        The scratch buffer used, to pass back next time.
    """
    pg = dist.group.WORLD
    w, r = dist.get_world_size(), dist.get_rank()
    if w == 1:
        return scratch
    n = flat.numel()
    num_chunks = max(1, -(-n * flat.element_size() // chunk_bytes))
    cap = -(-n // num_chunks)
    if scratch is None or scratch.numel() < 4 * cap or scratch.dtype != flat.dtype:
        scratch = torch.empty(4 * cap, dtype=flat.dtype, device=flat.device)
    children = [c for c in (2 * r + 1, 2 * r + 2) if c < w]
    parent = (r - 1) // 2 if r else None

    def piece(c: int) -> Tensor:
        return flat[n * c // num_chunks : n * (c + 1) // num_chunks]

    def slot(i: int, c: int) -> Tensor:  # child i, chunk c: double-buffered by chunk parity
        off = (2 * i + c % 2) * cap
        return scratch[off : off + piece(c).numel()]

    def post_child_recvs(c: int) -> list[dist.Work]:
        return [pg.recv([slot(i, c)], child, c) for i, child in enumerate(children)]

    up: list[dist.Work] = []
    down: list[dist.Work] = []
    pending = [post_child_recvs(c) for c in range(min(2, num_chunks))]
    for c in range(num_chunks):
        for i, work in enumerate(pending.pop(0)):
            work.wait()
            piece(c).add_(slot(i, c))
        if c + 2 < num_chunks:
            pending.append(post_child_recvs(c + 2))
        if parent is None:  # the root holds the sum of chunk c: start it down at once
            down += [pg.send([piece(c)], child, num_chunks + c) for child in children]
        else:
            up.append(pg.send([piece(c)], parent, c))
    if parent is not None:
        recvs = []
        for c in range(num_chunks):
            up[c].wait()  # the broadcast overwrites what this send reads
            recvs.append(pg.recv([piece(c)], parent, num_chunks + c))
        for c in range(num_chunks):
            recvs[c].wait()
            down += [pg.send([piece(c)], child, num_chunks + c) for child in children]
    for work in down:
        work.wait()
    return scratch


@plugin("strategy", "tree-allreduce")
class TreeAllReduce(DataParallel):
    """Data parallel; gradients summed up a binary tree and broadcast down, over send/recv (latency-bound)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StrategyConfig):
        chunk_bytes: int = 1 << 20
        """Pipeline chunk size in bytes; buffers up to this size go up and down the tree in one message."""

        def __post_init__(self) -> None:
            StrategyConfig.__post_init__(self)
            if self.chunk_bytes < 64:
                raise ValueError(f"chunk_bytes must be >= 64, got {self.chunk_bytes}")

    config: Config
    point_to_point = True
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {"chunks": ParityCase(options={"chunk_bytes": 512})}
    _scratch: Tensor | None = None

    def all_reduce_(self, flat: Tensor) -> None:
        self._scratch = tree_all_reduce(flat, chunk_bytes=self.config.chunk_bytes, scratch=self._scratch)
