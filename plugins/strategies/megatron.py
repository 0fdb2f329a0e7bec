"""The ``megatron`` strategy: Megatron-LM tensor parallelism inside layers, data parallelism across groups.

Within a tensor-parallel group each rank holds 1/tp of every attention (its heads: column-parallel q, k,
v; row-parallel proj) and of every MLP (column-parallel fc, row-parallel proj); the conjugate f/g
operators cost one all-reduce forward and one backward per sublayer. The dp groups each take their own
rows of the global batch and average gradients in one all-reduce per step. With ``pp`` > 1 the
tensor-parallel model is further split into pipeline stages (torch.distributed.pipelining).

Ranks are laid out by :class:`fedge.parallel.ParallelDims` (tp innermost). Example::

    fedge train --strategy megatron --nproc 4 --model tiny-gpt -o tp=2 -o dp=2
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from fedge.errors import ConfigError
from fedge.parallel import MeshAxis, ParallelDims
from fedge.plugins.strategies._megatron_layers import gather_tp_state, gather_tp_tensor, parallelize_tp, tp_slice
from fedge.plugins.strategies._model_parallel import ModelParallel
from fedge.plugins.strategies._pipeline_groups import allreduce_grads, gather_to_rank0, make_groups
from fedge.plugins.strategies._pipeline_stage import StageModule, StageRunner, resolve_split
from fedge.plugins.train.base import ParityCase, StrategyConfig, batch_rows, set_lr
from fedge.plugins.train.blocks import model_blocks
from fedge.registry import plugin

__all__ = ["Megatron"]


@plugin("strategy", "megatron")
class Megatron(ModelParallel):
    """Megatron-style tensor parallelism (column/row-parallel layers, heads split) x data parallelism."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StrategyConfig):
        tp: int = 2
        """Tensor-parallel ranks per layer; must divide the attention heads and the MLP width."""
        dp: int = 0
        """Data-parallel groups; 0 means world size / (tp x pp)."""
        pp: int = 1
        """Pipeline stages over the tensor-parallel model (1: no pipeline)."""
        microbatches: int = 4
        """Micro-batches per step when pp > 1."""
        schedule: Literal["gpipe", "1f1b"] = "1f1b"
        """Pipeline schedule when pp > 1."""
        vocab_parallel: bool = False
        """Split token embeddings by vocabulary rows too (one more all-reduce forward; for large vocabularies)."""

        def __post_init__(self) -> None:
            StrategyConfig.__post_init__(self)
            if self.tp < 1 or self.pp < 1 or self.dp < 0 or self.microbatches < 1:
                raise ValueError("tp, pp and microbatches must be >= 1, dp >= 0 (0: world size / (tp x pp))")

    config: Config
    recomputes: ClassVar[bool] = True
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {"tp2": ParityCase(options={"tp": 2}, model="tiny-gpt")}

    @classmethod
    def layout(cls, config: StrategyConfig, world_size: int) -> ParallelDims:
        """The validated dp x tp x pp layout for ``world_size`` processes."""
        assert isinstance(config, cls.Config)
        if config.dp:
            return ParallelDims(dp=config.dp, tp=config.tp, pp=config.pp, world_size=world_size)
        return ParallelDims.infer_dp(world_size=world_size, tp=config.tp, pp=config.pp)

    def setup(self, model: nn.Module) -> None:
        dims, rank, c = self.dims, self.ctx.rank, self.config
        coords = dims.coords(rank)
        self.dp_index, self.stage_index = coords[MeshAxis.DP], coords[MeshAxis.PP]
        groups = make_groups(dims, rank)
        self.tp_group, self.dp_group = groups[MeshAxis.TP], groups[MeshAxis.DP]
        self.shard_dims = parallelize_tp(
            model, group=self.tp_group, rank=coords[MeshAxis.TP], size=dims.tp, vocab_parallel=c.vocab_parallel
        )
        self.runner: StageRunner | None = None
        names = [n for n, _ in model_blocks(model)]
        if dims.pp > 1:
            if not isinstance(model, nn.Sequential):
                raise ConfigError(
                    f"megatron with pp > 1 splits an nn.Sequential by position; got {type(model).__name__}"
                )
            sizes = resolve_split(
                list(model.children()), num_stages=dims.pp, split=(), balance="params", sample=None, flag="pp"
            )
            model = StageModule.of(model, sizes, self.stage_index)
        self.model = model.to(self.ctx.device)
        # Recomputing a block redoes its forward all-reduces in backward: every tp rank recomputes alike.
        self.control_blocks(self.model, names=names)
        if dims.pp > 1:
            self.runner = self.make_runner(self.model, stage_index=self.stage_index, group=groups[MeshAxis.PP])
        self.optimizer = self.make_optimizer(self.model.parameters())

    def train_step(self, x: Tensor, y: Tensor, *, step: int) -> float:
        dims = self.dims
        self.check_batch(len(x))
        x, y = batch_rows(x, y, self.dp_index, dims.dp)
        x, y = x.to(self.ctx.device), y.to(self.ctx.device)
        set_lr(self.optimizer, self.lr_at(step, len(x) * dims.dp))
        self.optimizer.zero_grad(set_to_none=True)
        if self.runner is not None:
            loss, idle = self.runner.step(x, y)
        else:
            out = F.cross_entropy(self.model(x), y)
            out.backward()
            loss, idle = float(out.detach()), 0.0
        allreduce_grads(list(self.model.parameters()), group=self.dp_group, size=dims.dp)
        self.optimizer.step()
        # Every tp rank of a last stage holds the same loss; average over dp groups in one all-reduce.
        is_last = self.stage_index == dims.pp - 1
        return self.reduce_loss(loss / (dims.dp * dims.tp) if is_last else 0.0, idle, self.runner)

    def holds_state(self) -> bool:
        coords = self.dims.coords(self.ctx.rank)
        return coords[MeshAxis.TP] == 0 and coords[MeshAxis.DP] == 0

    def gathered(self, name: str, t: Tensor) -> Tensor:
        if name not in self.shard_dims or self.dims.tp == 1:
            return t
        return gather_tp_tensor(t, self.shard_dims[name], group=self.tp_group, size=self.dims.tp)

    def slice_of(self, name: str, full: Tensor) -> Tensor:
        if name not in self.shard_dims or self.dims.tp == 1:
            return full
        return tp_slice(full, self.shard_dims[name], rank=self.dims.coords(self.ctx.rank)[MeshAxis.TP], size=self.dims.tp)

    def full_state_dict(self) -> dict[str, Tensor] | None:
        full = gather_tp_state(self.model, self.shard_dims, group=self.tp_group, size=self.dims.tp)
        coords = self.dims.coords(self.ctx.rank)
        keep = coords[MeshAxis.TP] == 0 and coords[MeshAxis.DP] == 0
        return gather_to_rank0(full if keep else {})
