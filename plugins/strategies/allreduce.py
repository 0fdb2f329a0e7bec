"""Data parallel on the backend's native all_reduce, bucketed and overlapped with backward (as DDP does).

Parameters are grouped, in reverse order (the order backward produces their gradients), into buckets of
about ``bucket_mb``; each bucket is one flat buffer whose slices are the parameters' ``.grad``. A
post-accumulate-grad hook counts the gradients that are ready; when a bucket is full its communication is
launched asynchronously, so it runs while backward computes the earlier layers' gradients. Buckets are
launched in index order on every rank, so the collectives match across ranks.

The comm-hook seam is DDP's idea: a hook takes a bucket (a flat tensor, this rank's summed-in-place
gradients) and returns a ``torch.futures.Future`` whose value is the bucket summed over all ranks.
``comm_hook = "fp16"`` compresses to half precision on the wire; ``comm_hook = "powersgd"`` runs torch's own
``ddp_comm_hooks.powerSGD_hook`` (low-rank gradients with error feedback, Vogels et al. 2019) unchanged, with
its ``PowerSGDState``, on each fedge bucket seen through a ``dist.GradBucket``-shaped view; pass your own to
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
        self.extra = extra
        self.flat = flat_grad_buffer(params, extra=extra)
        self.ready = 0
        self.future: torch.futures.Future[Tensor] | None = None


class _GradBucket:
    """What torch's DDP comm hooks read of a ``dist.GradBucket``, over one fedge bucket. The trailing loss
    slot is one more (1-element) gradient, so PowerSGD averages it uncompressed with the biases."""

    def __init__(self, bucket: _Bucket, index: int, *, last: bool) -> None:
        self._bucket, self._index, self._last = bucket, index, last

    def buffer(self) -> Tensor:
        return self._bucket.flat

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def gradients(self) -> list[Tensor]:
        grads = [p.grad for p in self._bucket.params]
        tail = [self._bucket.flat[-self._bucket.extra :]] if self._bucket.extra else []
        return [g for g in grads if g is not None] + tail


class _PowerSGD:
    """fedge's comm-hook contract (bucket in, future of its sum out) around torch's ``powerSGD_hook``."""

    def __init__(self, strategy: AllReduce) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

        c = strategy.config
        self.strategy = strategy
        self.state = PowerSGDState(
            process_group=None, matrix_approximation_rank=c.powersgd_rank, start_powerSGD_iter=c.powersgd_start_step,
            min_compression_rate=c.powersgd_min_compression_rate, use_error_feedback=True, warm_start=True,
        )  # fmt: skip

    def reset(self) -> None:
        """Buckets changed shape (a block froze): their error and warm-start memories no longer fit."""
        self.state.error_dict.clear()
        self.state.p_memory_dict.clear()
        self.state.q_memory_dict.clear()

    def state_dict(self) -> dict[str, object]:
        """The PowerSGDState as torch's ``__getstate__`` pickles it (every slot but the process group): the
        error feedback and warm-start memories per bucket, the step count and the random generator."""
        return {slot: getattr(self.state, slot) for slot in self.state.__slots__ if slot != "process_group"}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for slot, value in state.items():  # as torch's __setstate__, keeping the process group set up here
            setattr(self.state, slot, value)

    def __call__(self, flat: Tensor) -> torch.futures.Future[Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook

        buckets = self.strategy.buckets
        index = next(i for i, b in enumerate(buckets) if b.flat is flat)
        view = _GradBucket(buckets[index], index, last=index == len(buckets) - 1)
        w = dist.get_world_size()
        # torch's hook returns the average; fedge's contract is the sum (the strategy divides once).
        return powerSGD_hook(self.state, view).then(lambda fut: fut.value().mul_(w))  # type: ignore[arg-type]


@plugin("strategy", "allreduce")
class AllReduce(DataParallel):
    """Data parallel on the backend's native all_reduce: bucketed gradients, launched from hooks during backward."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StrategyConfig):
        bucket_mb: float = 25.0
        """Bucket size in MiB (DDP's ``bucket_cap_mb``): larger means fewer, later messages."""
        first_bucket_mb: float = 1.0
        """Size of the first bucket (the last layers), small so communication starts early in backward."""
        comm_hook: Literal["allreduce", "fp16", "powersgd"] = "allreduce"
        """What a bucket does on the wire: ``allreduce`` (exact), ``fp16`` (half the bytes, not bit-exact) or
        ``powersgd`` (torch's PowerSGD hook: rank-r factors of each weight matrix, with error feedback)."""
        powersgd_rank: int = 1
        """``powersgd``: rank of the low-rank approximation (torch's ``matrix_approximation_rank``)."""
        powersgd_start_step: int = 10
        """``powersgd``: plain all-reduce for this many steps first (torch's ``start_powerSGD_iter``; >= 2)."""
        powersgd_min_compression_rate: float = 2.0
        """``powersgd``: compress a matrix only if that shrinks it at least this many times; others go as they are."""

        def __post_init__(self) -> None:
            StrategyConfig.__post_init__(self)
            if self.bucket_mb <= 0 or self.first_bucket_mb <= 0:
                raise ValueError(f"bucket sizes must be > 0 MiB, got {self.bucket_mb} and {self.first_bucket_mb}")
            if self.powersgd_rank < 1 or self.powersgd_start_step < 2 or self.powersgd_min_compression_rate < 1:
                raise ValueError(
                    "powersgd_rank must be >= 1, powersgd_start_step >= 2 (error feedback needs two plain steps) "
                    f"and powersgd_min_compression_rate >= 1; got {self.powersgd_rank}, {self.powersgd_start_step}, "
                    f"{self.powersgd_min_compression_rate}"
                )

    config: Config
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {
        "default": ParityCase(),
        # Small buckets so the multi-bucket path runs.
        "buckets": ParityCase(options={"bucket_mb": 0.002, "first_bucket_mb": 0.001}),
    }

    def setup(self, model: nn.Module) -> None:
        self.model = model.to(self.ctx.device)
        self.blocks = self.control_blocks(self.model)
        self.optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.powersgd = _PowerSGD(self) if self.config.comm_hook == "powersgd" else None
        self.comm_hook: CommHook = self.powersgd or _HOOKS[self.config.comm_hook]
        self.on_freeze()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def on_freeze(self) -> None:
        """Bucket the parameters that still train (reverse order, as DDP): frozen ones are never sent."""
        self.params = [p for p in self.model.parameters() if p.requires_grad]
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
        if self.powersgd is not None:
            self.powersgd.reset()
        self._sent_numel = 0

    def step_metrics(self) -> dict[str, float]:
        """``grad_bytes``: the gradient payload each rank hands to all_reduce in the last step (PowerSGD: its P
        and Q factors plus what it leaves uncompressed; fp16: half)."""
        per = 2 if self.config.comm_hook == "fp16" else self.flat.element_size()
        return {"grad_bytes": float(self._sent_numel * per)}

    def register_comm_hook(self, hook: CommHook) -> None:
        """Replace what each bucket does on the wire (see the module docstring for the contract)."""
        self.comm_hook = hook

    def _on_grad(self, p: Tensor) -> None:
        if self.ctx.world_size == 1:
            return
        if p not in self._bucket_of:  # frozen since the hooks were registered
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
        if self.blocks.update(step):
            self.on_freeze()
        xb, yb = batch_rows(x, y, r, w)
        for bucket in self.buckets:
            bucket.flat.zero_()
            bucket.ready, bucket.future = 0, None
        self._next = 0
        self.model.train()
        with self.autocast():
            loss = F.cross_entropy(self.model(xb.to(self.ctx.device)), yb.to(self.ctx.device))
        self.flat[-1] = loss.detach()  # set before backward: bucket 0 may launch during it
        stats = self.powersgd.state.total_numel_after_compression if self.powersgd else 0
        loss.backward()
        if w > 1:
            self._launch_ready(all_buckets=True)  # buckets with unused parameters
            for bucket in self.buckets:
                assert bucket.future is not None
                summed = bucket.future.wait()
                if summed.data_ptr() != bucket.flat.data_ptr():
                    bucket.flat.copy_(summed)
                bucket.flat.div_(w)
        self._sent_numel = self._count_sent(stats)
        self.optimizer.step()
        return float(self.flat[-1])

    def _count_sent(self, stats_before: int) -> int:
        """Gradient elements sent this step, without the loss slot."""
        full = sum(b.flat.numel() for b in self.buckets) - 1
        if self.powersgd is None or self.powersgd.state.total_numel_after_compression == stats_before:
            return full if self.ctx.world_size > 1 else 0
        return self.powersgd.state.total_numel_after_compression - stats_before - 1

    def local_state(self) -> dict[str, object]:
        # Each rank's error feedback is its own residual: it resumes only at the same world size.
        return {"powersgd": self.powersgd.state_dict()} if self.powersgd is not None else {}

    def load_local_state(self, state: dict[str, object]) -> None:
        if self.powersgd is not None and "powersgd" in state:
            self.powersgd.load_state_dict(state["powersgd"])  # type: ignore[arg-type]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
