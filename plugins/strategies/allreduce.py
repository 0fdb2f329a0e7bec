"""Data parallel on the backend's native all_reduce, bucketed and overlapped with backward (as DDP does).

Parameters are grouped, in reverse order (the order backward produces their gradients), into buckets of
about ``bucket_mb``; each bucket is one flat buffer whose slices are the parameters' ``.grad``. A
post-accumulate-grad hook counts the gradients that are ready; when a bucket is full its communication is
launched asynchronously, so it runs while backward computes the earlier layers' gradients. Buckets are
launched in index order on every rank, so the collectives match across ranks.

The comm-hook seam is DDP's idea: a hook takes a bucket (a flat tensor, this rank's summed-in-place
gradients) and returns a ``torch.futures.Future`` whose value is the bucket summed over all ranks.
``comm_hook = "fp16"`` compresses to half precision on the wire; pass your own to
:meth:`AllReduce.register_comm_hook`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fedge.plugins.strategies._data_parallel import DataParallel, flat_grad_buffer
from fedge.plugins.train.base import ParityCase, StrategyConfig, batch_rows, set_lr
from fedge.registry import plugin

__all__ = ["AllReduce", "CommHook", "allreduce_hook", "fp16_compress_hook"]

CommHook = Callable[[Tensor], "torch.futures.Future[Tensor]"]


def allreduce_hook(bucket: Tensor) -> torch.futures.Future[Tensor]:
    """Sum the bucket over all ranks with the backend's all_reduce, asynchronously."""
    work = dist.all_reduce(bucket, async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def fp16_compress_hook(bucket: Tensor) -> torch.futures.Future[Tensor]:
    """Like :func:`allreduce_hook` with half the bytes on the wire (sum in float16, back to the bucket's dtype)."""
    half = bucket.to(torch.float16)
    work = dist.all_reduce(half, async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: bucket.copy_(fut.value()[0]))


_HOOKS: dict[str, CommHook] = {"allreduce": allreduce_hook, "fp16": fp16_compress_hook}


class _Bucket:
    def __init__(self, params: list[nn.Parameter], *, extra: int) -> None:
        self.params = params
        self.flat = flat_grad_buffer(params, extra=extra)
        self.ready = 0
        self.future: torch.futures.Future[Tensor] | None = None


@plugin("strategy", "allreduce")
class AllReduce(DataParallel):
    """Data parallel on the backend's native all_reduce: bucketed gradients, launched from hooks during backward."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StrategyConfig):
        bucket_mb: float = 25.0
        """Bucket size in MiB (DDP's ``bucket_cap_mb``): larger means fewer, later messages."""
        first_bucket_mb: float = 1.0
        """Size of the first bucket (the last layers), small so communication starts early in backward."""
        comm_hook: Literal["allreduce", "fp16"] = "allreduce"
        """What a bucket does on the wire: ``allreduce`` (exact) or ``fp16`` (compressed, not bit-exact)."""

        def __post_init__(self) -> None:
            StrategyConfig.__post_init__(self)
            if self.bucket_mb <= 0 or self.first_bucket_mb <= 0:
                raise ValueError(f"bucket sizes must be > 0 MiB, got {self.bucket_mb} and {self.first_bucket_mb}")

    config: Config
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {
        "default": ParityCase(),
        # Small buckets so the multi-bucket path runs.
        "buckets": ParityCase(options={"bucket_mb": 0.002, "first_bucket_mb": 0.001}),
    }

    def setup(self, model: nn.Module) -> None:
        self.model = model.to(self.ctx.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.make_optimizer(self.params)
        self.comm_hook: CommHook = _HOOKS[self.config.comm_hook]
        self.buckets: list[_Bucket] = []
        group: list[nn.Parameter] = []
        cap, size = self.config.first_bucket_mb * 2**20, 0
        for p in reversed(self.params):
            if group and size + p.numel() * p.element_size() > cap:
                self.buckets.append(_Bucket(group, extra=0 if self.buckets else 1))
                group, size, cap = [], 0, self.config.bucket_mb * 2**20
            group.append(p)
            size += p.numel() * p.element_size()
        self.buckets.append(_Bucket(group, extra=0 if self.buckets else 1))
        self.flat = self.buckets[0].flat  # its last slot carries the loss (DataParallel's convention)
        self._bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b.params}
        self._next = 0  # buckets launch in index order on every rank so the collectives match
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def register_comm_hook(self, hook: CommHook) -> None:
        """Replace what each bucket does on the wire (see the module docstring for the contract)."""
        self.comm_hook = hook

    def _on_grad(self, p: Tensor) -> None:
        if self.ctx.world_size == 1:
            return
        bucket = self.buckets[self._bucket_of[p]]
        bucket.ready += 1
        self._launch_ready()

    def _launch_ready(self, *, all_buckets: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not all_buckets and bucket.ready < len(bucket.params):
                return
            bucket.future = self.comm_hook(bucket.flat)
            self._next += 1

    def train_step(self, x: Tensor, y: Tensor, *, step: int) -> float:
        w, r = self.ctx.world_size, self.ctx.rank
        set_lr(self.optimizer, self.lr_at(step, x.shape[0]))
        xb, yb = batch_rows(x, y, r, w)
        for bucket in self.buckets:
            bucket.flat.zero_()
            bucket.ready, bucket.future = 0, None
        self._next = 0
        self.model.train()
        with self.autocast():
            loss = F.cross_entropy(self.model(xb.to(self.ctx.device)), yb.to(self.ctx.device))
        self.flat[-1] = loss.detach()  # set before backward: bucket 0 may launch during it
        loss.backward()
        if w > 1:
            self._launch_ready(all_buckets=True)  # buckets with unused parameters
            for bucket in self.buckets:
                assert bucket.future is not None
                summed = bucket.future.wait()
                if summed.data_ptr() != bucket.flat.data_ptr():
                    bucket.flat.copy_(summed)
                bucket.flat.div_(w)
        self.optimizer.step()
        return float(self.flat[-1])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
