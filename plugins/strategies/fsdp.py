"""Fully sharded data parallel (ZeRO-3) on torch's ``fully_shard`` (FSDP2): each rank keeps 1/W of every
parameter, gradient and momentum buffer; a layer's parameters are all-gathered for its forward and
backward and its gradients reduce-scattered (averaged) after it.

Each child module of the model that has parameters is its own FSDP unit (so one unit's all-gather can
overlap the previous unit's compute), then the root. Parameters are DTensors sharded on dim 0 over a 1-D
device mesh of all ranks, so checkpoints go through torch.distributed.checkpoint shard by shard and load at
any world size. Parity: the averaged gradients of equal-sized shards are the global-batch gradient, so W
ranks train as one process does (fp32, rtol 1e-5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fedge.plugins.train.base import ParityCase, Strategy, StrategyConfig, batch_rows, load_sgd_state, set_lr, sgd_state
from fedge.registry import plugin

__all__ = ["FSDP"]


@plugin("strategy", "fsdp")
class FSDP(Strategy):
    """Fully sharded data parallel (ZeRO-3) with torch's fully_shard (FSDP2): params, grads and momentum sharded."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StrategyConfig):
        reshard_after_forward: bool = True
        """Free each unit's gathered parameters after its forward and gather them again for backward (ZeRO-3);
        false keeps them until backward (ZeRO-2-like: more memory, one all-gather less per unit)."""

    config: Config
    replicated: ClassVar[bool] = False
    resizable: ClassVar[bool] = True
    freezes: ClassVar[bool] = True
    recomputes: ClassVar[bool] = True
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {"default": ParityCase()}

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.model = model.to(self.ctx.device)
        # Inside each unit's hooks: a frozen unit is gathered for forward only (no backward, no reduce-scatter);
        # a recomputed one is gathered again for backward anyway, where its forward is redone.
        self.blocks = self.control_blocks(self.model)
        mesh = init_device_mesh(self.ctx.device.type, (self.ctx.world_size,))
        for child in self.model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh, reshard_after_forward=self.config.reshard_after_forward)
        fully_shard(self.model, mesh=mesh, reshard_after_forward=self.config.reshard_after_forward)
        self.optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])

    def train_step(self, x: Tensor, y: Tensor, *, step: int) -> float:
        set_lr(self.optimizer, self.lr_at(step, x.shape[0]))
        self.blocks.update(step)  # FSDP reduce-scatters only gradients that exist
        xb, yb = batch_rows(x, y, self.ctx.rank, self.ctx.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        with self.autocast():
            loss = F.cross_entropy(self.model(xb.to(self.ctx.device)), yb.to(self.ctx.device))
        loss.backward()  # gradients arrive reduce-scattered: this rank's shard of the global-batch mean
        self.optimizer.step()
        total = loss.detach().reshape(1)
        dist.all_reduce(total)
        return float(total) / self.ctx.world_size

    def step_metrics(self) -> dict[str, float]:
        # What each rank hands to reduce-scatter (the unsharded gradients of the units that still train).
        return {"grad_bytes": float(sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad))}

    def full_state_dict(self) -> dict[str, Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ctx.rank != 0:
            return None
        return {k: v.detach().clone() for k, v in full.items()}

    def global_state(self) -> dict[str, Any]:
        # DTensor shards: DCP writes each rank's shard and reshards on load at another world size.
        return sgd_state(self.model, self.optimizer)

    def load_global_state(self, state: dict[str, Any], *, step: int) -> None:
        load_sgd_state(self.model, self.optimizer, state)

    def state_for_checkpoint(self) -> dict[str, Any]:
        raise NotImplementedError("fsdp checkpoints through global_state (DCP)")

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("fsdp checkpoints through global_state (DCP)")
