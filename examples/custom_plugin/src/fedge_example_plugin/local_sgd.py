"""Local SGD (periodic model averaging) as a fedge ``strategy`` plugin, on torch.distributed.

Each rank takes an SGD step on its own rows of the global batch and keeps its own momentum; every
``period`` steps the ranks average their parameters with one all-reduce (Lin et al., "Don't Use Large
Mini-Batches, Use Local SGD", 2020). With ``period = 1`` it is synchronous SGD: the average of the
ranks' updates is the update of the whole batch, momentum included (momentum is linear in the gradients).

Run it (after ``pip install ./examples/custom_plugin``)::

    fedge train --strategy local-sgd --nproc 2 -o period=4
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fedge.plugins.train.base import ParityCase, Strategy, StrategyConfig, batch_rows, set_lr
from fedge.registry import plugin


@plugin("strategy", "local-sgd")
class LocalSGD(Strategy):
    """Local SGD: ranks step on their own rows and average their parameters every `period` steps."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StrategyConfig):
        period: int = 4
        """Average the parameters across ranks every this many steps (1: after every step, as synchronous SGD)."""

        def __post_init__(self) -> None:
            StrategyConfig.__post_init__(self)
            if self.period < 1:
                raise ValueError(f"period must be >= 1, got {self.period}")

    config: Config
    # Momentum differs per rank, so each rank checkpoints its own state.
    replicated: ClassVar[bool] = False
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {"every-step": ParityCase(options={"period": 1})}

    def setup(self, model: nn.Module) -> None:
        self.model = model.to(self.ctx.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.make_optimizer(self.params)

    def train_step(self, x: Tensor, y: Tensor, *, step: int) -> float:
        w = self.ctx.world_size
        set_lr(self.optimizer, self.lr_at(step, x.shape[0]))
        xb, yb = batch_rows(x, y, self.ctx.rank, w)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        loss = F.cross_entropy(self.model(xb.to(self.ctx.device)), yb.to(self.ctx.device))
        loss.backward()
        self.optimizer.step()
        if (step + 1) % self.config.period == 0:
            return self._average(loss.detach())
        total = loss.detach().reshape(1)
        dist.all_reduce(total)  # the logged loss is the whole batch's, also between averages
        return float(total) / w

    def _average(self, loss: Tensor) -> float:
        """Average parameters (and the loss, in the last slot) over all ranks with one all-reduce."""
        flat = torch.cat([parameters_to_vector(self.params), loss.reshape(1)])
        dist.all_reduce(flat)
        flat.div_(self.ctx.world_size)
        with torch.no_grad():
            vector_to_parameters(flat[:-1], self.params)
        return float(flat[-1])

    def full_state_dict(self) -> dict[str, Tensor] | None:
        self._average(torch.zeros((), device=self.ctx.device))  # the model is the ranks' average
        if self.ctx.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
