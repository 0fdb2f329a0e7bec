"""The ``pipeline`` strategy: an ``nn.Sequential`` split by layers into stages fed with micro-batches.

Stages and schedules (GPipe: all forwards then all backwards; 1F1B: one forward, one backward in the
steady state, so at most p micro-batches of activations are live) are torch.distributed.pipelining's
``PipelineStage``, ``ScheduleGPipe`` and ``Schedule1F1B``. fedge adds the balanced split, optional
recomputation, data-parallel replicas of the whole pipeline (``dp``), and the measured bubble.

Example::

    fedge train --strategy pipeline --nproc 2 --model tiny-gpt -o stages=2 -o microbatches=4 -o schedule=1f1b
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fedge.errors import ConfigError
from fedge.parallel import MeshAxis, ParallelDims
from fedge.plugins.models import model_spec
from fedge.plugins.strategies._model_parallel import ModelParallel, check_pipeline
from fedge.plugins.strategies._pipeline_groups import allreduce_grads, gather_to_rank0, make_groups
from fedge.plugins.strategies._pipeline_stage import StageModule, resolve_split
from fedge.plugins.train.base import ParityCase, StrategyConfig, batch_rows, set_lr
from fedge.registry import plugin

__all__ = ["Pipeline", "check_pipeline", "sample_input"]

logger = logging.getLogger(__name__)


def sample_input(model: nn.Module, rows: int = 8) -> Tensor | None:
    """A random batch the model accepts, from the input shape a fedge-built model carries; None if unknown."""
    spec = model_spec(model)
    if spec is None:
        return None
    shape = (rows, *spec["input_shape"])
    vocab = int(spec.get("config", {}).get("vocab_size", 0) or 0)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, shape, generator=gen) if vocab else torch.randn(shape, generator=gen)


def _chosen_stages(config: Pipeline.Config) -> str:
    """How the user set the stage count, in their words: ``stages=3`` or ``split=1,2,1 (3 stages)``."""
    if config.stages:
        return f"stages={config.stages}"
    return f"split={','.join(map(str, config.split))} ({len(config.split)} stages)"


def _processes(world_size: int) -> str:
    return f"{world_size} process{'es' if world_size != 1 else ''} (--nproc x nodes)"


@plugin("strategy", "pipeline")
class Pipeline(ModelParallel):
    """Pipeline parallelism: layers split into stages, micro-batches on a GPipe or 1F1B schedule."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StrategyConfig):
        stages: int = 0
        """Pipeline stages (one process each); 0 means world size / dp (the length of ``split`` if given)."""
        microbatches: int = 4
        """Micro-batches per step; must divide each replica's rows of the global batch."""
        schedule: Literal["gpipe", "1f1b"] = "1f1b"
        """``gpipe`` (fill, then drain) or ``1f1b`` (same bubble, activations of at most p micro-batches live)."""
        balance: Literal["params", "time"] = "params"
        """Automatic split: equal parameter counts, or equal measured forward+backward time per stage."""
        split: tuple[int, ...] = ()
        """Explicit layers per stage (e.g. ``1,3,2``); overrides ``balance``."""
        recompute: bool = False
        """Recompute each layer's activations in backward instead of keeping them (less memory, ~1/3 more compute)."""
        dp: int = 0
        """Data-parallel replicas of the whole pipeline (world size = stages x dp); 0 means world size / stages,
        or 1 when ``stages`` is 0 too."""

        def __post_init__(self) -> None:
            StrategyConfig.__post_init__(self)
            if self.stages < 0 or self.dp < 0 or self.microbatches < 1:
                raise ValueError("stages and dp must be >= 0 (0: derived from the world size), microbatches >= 1")
            if self.split and self.stages and len(self.split) != self.stages:
                raise ValueError(f"split gives {len(self.split)} stages but stages = {self.stages}")

    config: Config
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {
        "1f1b": ParityCase(options={"stages": 2, "microbatches": 4}, model="tiny-gpt"),
    }

    @classmethod
    def layout(cls, config: StrategyConfig, world_size: int) -> ParallelDims:
        """The validated dp x pp layout for ``world_size`` processes.

        Raises:
            ConfigError: stages and dp do not fit the world size. The message speaks of what a pipeline
                user sets (stages or split, dp, the processes) and never of tensor parallelism.
        """
        assert isinstance(config, cls.Config)
        stages = config.stages or len(config.split)
        chosen = _chosen_stages(config)
        procs = _processes(world_size)
        if stages and config.dp:
            if stages * config.dp != world_size:
                raise ConfigError(
                    f"{chosen} x dp={config.dp} = {stages * config.dp} does not equal the {procs}; choose stages "
                    f"and dp whose product is {world_size}, or run {stages * config.dp} processes"
                )
            dp = config.dp
        elif stages:
            if stages > world_size:
                raise ConfigError(
                    f"{chosen} needs at least {stages} processes (one per stage), got {procs}; "
                    f"raise --nproc to a multiple of {stages} or use fewer stages"
                )
            if world_size % stages:
                raise ConfigError(
                    f"{chosen} does not divide the {procs}; use a stage count dividing {world_size}, "
                    f"or a multiple of {stages} processes"
                )
            dp = world_size // stages
        else:
            dp = config.dp or 1
            if world_size % dp:
                raise ConfigError(
                    f"dp={dp} does not divide the {procs}; set stages and dp so that stages x dp = {world_size}"
                )
            stages = world_size // dp
        return ParallelDims(dp=dp, pp=stages, world_size=world_size)

    def setup(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Sequential):
            raise ConfigError(f"pipeline splits an nn.Sequential by position; got {type(model).__name__}")
        c, dims, rank = self.config, self.dims, self.ctx.rank
        coords = dims.coords(rank)
        self.stage_index, self.dp_index = coords[MeshAxis.PP], coords[MeshAxis.DP]
        groups = make_groups(dims, rank)
        self.dp_group = groups[MeshAxis.DP]
        sizes = self._split(list(model.children()), model)
        self.sizes = sizes
        if rank == 0:
            logger.info("pipeline: layers per stage %s (%s)", sizes, "split" if c.split else f"balance={c.balance}")
        self.model = StageModule.of(model, sizes, self.stage_index, recompute=c.recompute).to(self.ctx.device)
        self.runner = self.make_runner(self.model, stage_index=self.stage_index, group=groups[MeshAxis.PP])
        self.optimizer = self.make_optimizer(self.model.parameters())

    def _split(self, layers: list[nn.Module], model: nn.Module) -> list[int]:
        c, pp, n = self.config, self.dims.pp, len(layers)
        if pp > n:  # said here in the pipeline's words; resolve_split would name a stages= the user may not have set
            if c.stages or c.split:
                raise ConfigError(
                    f"{_chosen_stages(c)} is more than the model's {n} top-level layers; use at most {n} stages"
                )
            raise ConfigError(
                f"{_processes(self.ctx.world_size)} / dp={self.dims.dp} make {pp} stages (one per process), more "
                f"than the model's {n} top-level layers; lower --nproc, raise dp, or set stages (at most {n})"
            )
        if c.balance == "time" and not c.split:
            # Timings differ between ranks; rank 0 decides so every rank builds the same split.
            box: list[object] = [None]
            if self.ctx.rank == 0:
                try:
                    box[0] = resolve_split(
                        layers, num_stages=self.dims.pp, split=(), balance="time", sample=sample_input(model)
                    )
                except ConfigError as err:
                    box[0] = err
            dist.broadcast_object_list(box, src=0)
            if isinstance(box[0], ConfigError):
                raise box[0]
            sizes: list[int] = box[0]  # type: ignore[assignment]
            return sizes
        return resolve_split(layers, num_stages=self.dims.pp, split=c.split, balance=c.balance, sample=None)

    def train_step(self, x: Tensor, y: Tensor, *, step: int) -> float:
        self.check_batch(len(x))
        x, y = batch_rows(x, y, self.dp_index, self.dims.dp)
        set_lr(self.optimizer, self.lr_at(step, len(x) * self.dims.dp))
        self.optimizer.zero_grad(set_to_none=True)
        loss, idle = self.runner.step(x.to(self.ctx.device), y.to(self.ctx.device))
        allreduce_grads(list(self.model.parameters()), group=self.dp_group, size=self.dims.dp)
        self.optimizer.step()
        is_last = self.stage_index == self.dims.pp - 1
        return self.reduce_loss(loss / self.dims.dp if is_last else 0.0, idle, self.runner)

    def full_state_dict(self) -> dict[str, Tensor] | None:
        # Replicas hold the same weights; only dp index 0 sends its stage.
        return gather_to_rank0(self.model.state_dict() if self.dp_index == 0 else {})
