"""Parameter server: parameters sharded over server ranks; workers push gradients and pull parameters.

With W workers and S servers (world = W + S), ranks 0..W-1 are workers and the last S ranks are
servers; server j owns slice j of the flattened parameters and its optimizer state. Every message is a
point-to-point send/recv (never gloo's reduce_scatter, which on gloo is a full all-reduce plus a copy).

- ``sync``: each step every worker pushes its gradient shards; each server waits for all W, applies
  their mean with SGD, and sends the new shard back. Same result as single-process training.
- ``async``: a server applies each push on arrival (scaled by 1/W) and answers that worker alone, so fast
  workers do not wait for slow ones - up to ``staleness`` steps: a worker more than ``staleness`` pushes
  ahead of the slowest gets its reply only when the slowest catches up (stale synchronous parallel).

The loss a worker's ``train_step`` returns (rank 0's is what ``metrics.jsonl`` logs) is the server's view:
each push carries the worker's loss, and each reply carries back the mean of the losses of every push
applied since that worker's previous reply. In ``sync`` mode those are the W pushes of this step, so it is
the global-batch loss; in ``async`` mode it is the loss over all workers' recent updates, not one
worker's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fedge.errors import ConfigError
from fedge.plugins.strategies._data_parallel import flat_grad_buffer
from fedge.plugins.strategies._host_staging import HostStage, needs_host_staging
from fedge.plugins.train.base import ParityCase, Strategy, StrategyConfig, batch_rows, set_lr
from fedge.registry import plugin

__all__ = ["ParameterServer", "ps_exchange"]

_PUSH, _PULL, _GATHER = 1, 2, 3  # message tags


def _shard_bounds(n: int, num_servers: int) -> list[int]:
    return [n * j // num_servers for j in range(num_servers + 1)]


def ps_exchange(flat: Tensor, *, num_servers: int = 1, buffers: list[Tensor] | None = None) -> list[Tensor]:
    """One synchronous push/pull round on ``flat`` (1-D): workers end holding the sum over workers.

    The last ``num_servers`` ranks act as servers (their ``flat`` is ignored and overwritten), the others
    as workers. This is the parameter-server traffic pattern without the optimizer, for benchmarks.

    Returns:
        The servers' receive buffers, to pass back as ``buffers`` next time.
    """
    pg = dist.group.WORLD
    world, r = dist.get_world_size(), dist.get_rank()
    workers = world - num_servers
    bounds = _shard_bounds(flat.numel(), num_servers)
    if r < workers:
        works = []
        for j in range(num_servers):
            piece = flat[bounds[j] : bounds[j + 1]]
            works += [pg.send([piece], workers + j, _PUSH), pg.recv([piece], workers + j, _PULL)]
        for work in works:
            work.wait()
        return buffers or []
    j = r - workers
    shard = flat[bounds[j] : bounds[j + 1]]
    if not buffers:
        buffers = [torch.empty_like(shard) for _ in range(workers)]
    for work in [pg.recv([buffers[k]], k, _PUSH) for k in range(workers)]:
        work.wait()
    shard.copy_(buffers[0])
    for buf in buffers[1:]:
        shard.add_(buf)
    for work in [pg.send([shard], k, _PULL) for k in range(workers)]:
        work.wait()
    return buffers


@plugin("strategy", "parameter-server")
class ParameterServer(Strategy):
    """Parameter server: params sharded over server ranks; workers push grads and pull params, sync or async."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StrategyConfig):
        num_servers: int = 1
        """Server ranks (the last ones); the rest are workers. Each server owns a slice of the parameters."""
        mode: Literal["sync", "async"] = "sync"
        """``sync``: every step averages all workers' gradients; ``async``: each push is applied on arrival."""
        staleness: int = 2
        """``async`` only: how many pushes a worker may run ahead of the slowest worker."""

        def __post_init__(self) -> None:
            StrategyConfig.__post_init__(self)
            if self.num_servers < 1:
                raise ValueError(f"num_servers must be >= 1, got {self.num_servers}")
            if self.staleness < 0:
                raise ValueError(f"staleness must be >= 0, got {self.staleness}")

    config: Config
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {
        "sync": ParityCase(options={"mode": "sync"}),
        "2-servers": ParityCase(options={"mode": "sync", "num_servers": 2}, world_sizes=(4,)),
    }
    replicated: ClassVar[bool] = False
    resizable: ClassVar[bool] = True
    freezes: ClassVar[bool] = True
    recomputes: ClassVar[bool] = True

    @classmethod
    def check_world_size(cls, config: StrategyConfig, world_size: int, batch_size: int) -> None:
        assert isinstance(config, cls.Config)
        workers = world_size - config.num_servers
        if workers < 1:
            raise ConfigError(
                f"parameter-server needs at least {config.num_servers + 1} processes ({config.num_servers} "
                f"server(s) + 1 worker), got {world_size}; raise --nproc or lower num_servers"
            )
        if batch_size % workers:
            raise ConfigError(
                f"batch size {batch_size} does not split evenly over {workers} workers "
                f"({world_size} processes - {config.num_servers} server{'s' if config.num_servers > 1 else ''}); "
                f"use a multiple of {workers}"
            )

    def setup(self, model: nn.Module) -> None:
        if self.config.mode == "async" and self.ctx.backend != "gloo":
            raise ConfigError("parameter-server mode = 'async' needs the gloo backend (it receives from any source)")
        self.num_workers = self.ctx.world_size - self.config.num_servers
        self.is_server = self.ctx.rank >= self.num_workers
        self.pg = dist.group.WORLD
        self.staged = needs_host_staging(self.ctx.backend, self.ctx.device)
        self._gstage, self._pstage = HostStage(), HostStage()
        # Under staging a server keeps its shard on the CPU: it only adds and sends, and gloo's p2p is host-only.
        self.model = model if self.is_server and self.staged else model.to(self.ctx.device)
        # Servers follow the schedule too: they must know which part of their shard no longer travels.
        self.blocks = self.control_blocks(self.model)
        self._layout = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in self._layout]
        self.frozen_numel = 0
        n = sum(p.numel() for p in params)
        # One trailing slot travels with the last shard: the loss (push) and the mean loss (pull).
        self.bounds = _shard_bounds(n, self.config.num_servers)
        self.bounds[-1] += 1
        if self.is_server:
            j = self.ctx.rank - self.num_workers
            full = torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(1, device=params[0].device)])
            self.shard = nn.Parameter(full[self.bounds[j] : self.bounds[j + 1]].clone())
            self.optimizer = self.make_optimizer([self.shard])
            self.inbox = [torch.empty_like(self.shard) for _ in range(self.num_workers)]
            self.received = [0] * self.num_workers
            self.deferred: list[int] = []
            # Per worker: sum and count of the losses pushed since its previous reply (last server only).
            self.loss_sum = [0.0] * self.num_workers
            self.loss_count = [0] * self.num_workers
            return
        # Worker: parameters and gradients are views into two flat buffers, so messages need no copies.
        self.pflat = torch.zeros(n + 1, device=self.ctx.device)
        offset = 0
        for p in params:
            self.pflat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.pflat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.gflat = flat_grad_buffer(params, extra=1)

    def _last(self, j: int) -> bool:
        return j == self.config.num_servers - 1

    def _region(self, j: int) -> tuple[int, int]:
        """What travels to and from server j: its slice past the frozen prefix (frozen blocks are the leading
        parameters), at least its last element so every step keeps one message each way."""
        a, b = self.bounds[j], self.bounds[j + 1]
        return min(max(a, self.frozen_numel), b - 1), b

    def _on_step(self, step: int) -> None:
        if not self.blocks.update(step):
            return
        self.frozen_numel = sum(p.numel() for p in self.blocks.frozen_parameters())
        if self.is_server:  # SGD then leaves the frozen part as it is: zero gradient, zero momentum
            buf = self.optimizer.state.get(self.shard, {}).get("momentum_buffer")
            if buf is not None:
                buf[: self._frozen_local()] = 0.0

    def _frozen_local(self) -> int:
        a, b = self.bounds[self.ctx.rank - self.num_workers], self.bounds[self.ctx.rank - self.num_workers + 1]
        return min(max(self.frozen_numel - a, 0), b - a)

    def step_metrics(self) -> dict[str, float]:
        sent = sum(b - a for a, b in map(self._region, range(self.config.num_servers)))
        return {"grad_bytes": float(2 * (sent - 1) * 4)}  # push and pull per worker, without the loss slot

    def train_step(self, x: Tensor, y: Tensor, *, step: int) -> float:
        self._on_step(step)
        if self.is_server:
            set_lr(self.optimizer, self.lr_at(step, x.shape[0]))
            return self._serve_sync() if self.config.mode == "sync" else self._serve_async(step)
        xb, yb = batch_rows(x, y, self.ctx.rank, self.num_workers)
        self.gflat.zero_()
        self.model.train()
        with self.autocast():
            loss = F.cross_entropy(self.model(xb.to(self.ctx.device)), yb.to(self.ctx.device))
        loss.backward()
        self.gflat[-1] = loss.detach()
        push, pull = (self._gstage.out(self.gflat), self._pstage.mirror(self.pflat)) if self.staged else (self.gflat, self.pflat)
        works = []
        for j in range(self.config.num_servers):
            a, b = self._region(j)
            server = self.num_workers + j
            works += [self.pg.send([push[a:b]], server, _PUSH), self.pg.recv([pull[a:b]], server, _PULL)]
        for work in works:
            work.wait()
        if self.staged:
            self._pstage.back(self.pflat)
        return float(self.pflat[-1])  # the server's mean over the pushes since our previous pull

    def _holds_loss(self) -> bool:
        return self._last(self.ctx.rank - self.num_workers)

    def _tally(self, push: Tensor) -> None:
        """Count the loss a worker sent in the push's trailing slot towards every worker's next reply."""
        if self._holds_loss():
            loss = float(push[-1])
            for k in range(self.num_workers):
                self.loss_sum[k] += loss
                self.loss_count[k] += 1

    def _apply(self, grad: Tensor) -> None:
        if self._holds_loss():
            grad[-1] = 0.0  # the trailing slot is not a parameter
        grad[: self._frozen_local()] = 0.0  # frozen: not sent (or one ignored element)
        self.shard.grad = grad
        self.optimizer.step()

    def _report_loss(self, k: int) -> float:
        """Put in the slot the mean loss of the pushes since worker k's previous reply; reset k's tally."""
        if not self._holds_loss():
            return float("nan")
        mean = self.loss_sum[k] / max(1, self.loss_count[k])
        self.loss_sum[k], self.loss_count[k] = 0.0, 0
        self.shard.data[-1] = mean
        return mean

    def _inbound(self, buf: Tensor) -> Tensor:
        """The part of a shard-sized buffer that travels this step (see :meth:`_region`)."""
        j = self.ctx.rank - self.num_workers
        return buf[self._region(j)[0] - self.bounds[j] :]

    def _serve_sync(self) -> float:
        for work in [self.pg.recv([self._inbound(self.inbox[k])], k, _PUSH) for k in range(self.num_workers)]:
            work.wait()
        for push in self.inbox:
            self._tally(push)
        self._apply(torch.stack(self.inbox).sum(0).div_(self.num_workers))
        # Every worker's tally holds the same W pushes, so one slot value serves all replies.
        means = [self._report_loss(k) for k in range(self.num_workers)]
        for work in [self.pg.send([self._inbound(self.shard.data)], k, _PULL) for k in range(self.num_workers)]:
            work.wait()
        return means[0]

    def _serve_async(self, step: int) -> float:
        """Apply pushes as they come until every worker has pushed for this step; reply within the staleness bound."""
        buf = self.inbox[0]
        while min(self.received) < step + 1:
            work = self.pg.recv_anysource([self._inbound(buf)], _PUSH)
            work.wait()
            k = work._source_rank()
            self.received[k] += 1
            self._tally(buf)
            self._apply(buf / self.num_workers)
            self.deferred.append(k)
            slowest = min(self.received)
            for k in [k for k in self.deferred if self.received[k] - slowest <= self.config.staleness]:
                self.deferred.remove(k)
                self._report_loss(k)
                self.pg.send([self._inbound(self.shard.data)], k, _PULL).wait()
        return float("nan")

    def full_state_dict(self) -> dict[str, Tensor] | None:
        # Pull the servers' current shards to rank 0 (in async mode a worker's copy may be stale).
        if self.is_server:
            self.pg.send([self.shard.data], 0, _GATHER).wait()
            return None
        if self.ctx.rank != 0:
            return None
        pull = self._pstage.mirror(self.pflat) if self.staged else self.pflat
        for j in range(self.config.num_servers):
            a, b = self.bounds[j], self.bounds[j + 1]
            self.pg.recv([pull[a:b]], self.num_workers + j, _GATHER).wait()
        if self.staged:
            self._pstage.back(self.pflat)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def state_for_checkpoint(self) -> dict[str, Any]:
        if self.is_server:
            return {
                "shard": self.shard.data,
                "optimizer": self.optimizer.state_dict(),
                "received": self.received,
                "loss_sum": self.loss_sum,
                "loss_count": self.loss_count,
            }
        return {"params": self.pflat}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if self.is_server:
            self.shard.data.copy_(state["shard"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.received = list(state["received"])
            # Checkpoints from before the loss tally have none: the next replies then count from here.
            self.loss_sum = list(state.get("loss_sum", self.loss_sum))
            self.loss_count = list(state.get("loss_count", self.loss_count))
        else:
            self.pflat.copy_(state["params"])

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return self._layout  # the flat layout of setup: frozen blocks keep their place in it

    def global_state(self) -> dict[str, Any]:
        """The servers' shards (parameters and momentum) put together on every rank with two all-reduces."""
        n = self.bounds[-1] - 1  # without the loss slot
        flat = torch.zeros(2, n + 1, device=self.ctx.device)
        if self.is_server:
            j = self.ctx.rank - self.num_workers
            a, b = self.bounds[j], self.bounds[j + 1]
            flat[0, a:b] = self.shard.data
            buf = self.optimizer.state.get(self.shard, {}).get("momentum_buffer")
            if buf is not None:
                flat[1, a:b] = buf
        dist.all_reduce(flat)
        model, momentum, offset = dict(self.model.state_dict()), {}, 0
        for name, p in self._trainable():
            model[name] = flat[0, offset : offset + p.numel()].view_as(p)
            momentum[name] = flat[1, offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return {"model": model, "momentum": momentum}

    def load_global_state(self, state: dict[str, Any], *, step: int) -> None:
        trainable = self._trainable()
        params = torch.cat([state["model"][name].reshape(-1).to(self.ctx.device) for name, _ in trainable])
        if not self.is_server:
            self.pflat[:-1].copy_(params)
            return
        momentum = torch.cat([state["momentum"][name].reshape(-1).to(self.ctx.device) for name, _ in trainable])
        j = self.ctx.rank - self.num_workers
        a, b = self.bounds[j], self.bounds[j + 1]
        end = min(b, params.numel())  # the last shard's loss slot is not a parameter
        self.shard.data.zero_()
        self.shard.data[: end - a].copy_(params[a:end])
        buf = torch.zeros_like(self.shard.data)
        buf[: end - a].copy_(momentum[a:end])
        self.optimizer.state[self.shard]["momentum_buffer"] = buf
        # Workers may differ in number now: every one has pushed for each step done so far.
        self.received = [step] * self.num_workers
        self.loss_sum, self.loss_count = [0.0] * self.num_workers, [0] * self.num_workers
