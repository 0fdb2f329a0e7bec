"""What ``pipeline`` and ``megatron`` share: a ``ParallelDims`` layout, the batch checks, the pipeline stage
runner, the measured bubble, and world-size independent checkpoints.

A checkpoint holds the model and SGD momentum as one process would (:func:`~fedge.plugins.train.base.sgd_state`),
assembled from every stage's layers (tensor-parallel shards gathered to full size), so a job resumes under
another layout: 2 stages -> 4 -> 2, another dp or tp. Each rank then takes its stage's layers, and its tp slice
of them. The whole model passes through every rank at a checkpoint; fine at the sizes these strategies train here."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from fedge.errors import ConfigError
from fedge.parallel import MeshAxis
from fedge.plugins.strategies._host_staging import needs_host_staging
from fedge.plugins.strategies._pipeline_groups import sum_across_world
from fedge.plugins.strategies._pipeline_stage import StageRunner
from fedge.plugins.train.base import DistContext, Strategy, StrategyConfig

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist
    from torch import nn

    from fedge.parallel import ParallelDims

__all__ = ["ModelParallel", "check_pipeline"]


class _Pipelined(Protocol):
    microbatches: int
    schedule: str


def check_pipeline(*, dp: int, pp: int, microbatches: int, batch_size: int) -> None:
    """Raise ConfigError unless each of the dp replicas' rows split into ``microbatches`` equal micro-batches."""
    if batch_size % dp:
        raise ConfigError(f"batch size {batch_size} does not split over dp={dp} replicas; use a multiple of {dp}")
    rows = batch_size // dp
    if pp > 1 and rows % microbatches:
        raise ConfigError(
            f"microbatches={microbatches} does not divide the {rows} rows each pipeline gets "
            f"(batch {batch_size} / dp {dp}); choose microbatches dividing {rows} or a batch size that is a multiple of "
            f"{dp * microbatches}"
        )


class ModelParallel(Strategy):
    """A strategy laid out by :meth:`layout` (its Config has ``microbatches`` and ``schedule``)."""

    resizable: ClassVar[bool] = True

    def __init__(self, config: StrategyConfig, ctx: DistContext) -> None:
        super().__init__(config, ctx)
        self.dims = self.layout(config, ctx.world_size)
        self.last_metrics: dict[str, float] = {}

    @classmethod
    @abc.abstractmethod
    def layout(cls, config: StrategyConfig, world_size: int) -> ParallelDims:
        """The validated layout for ``world_size`` processes."""

    @classmethod
    def check_world_size(cls, config: StrategyConfig, world_size: int, batch_size: int) -> None:
        if config.precision != "fp32":
            raise ConfigError(
                f"precision = {config.precision!r} is not supported by the model-parallel strategies yet (their stages "
                "run their own forward); use a data-parallel strategy or precision = 'fp32'"
            )
        dims = cls.layout(config, world_size)
        microbatches = cast(_Pipelined, config).microbatches
        check_pipeline(dp=dims.dp, pp=dims.pp, microbatches=microbatches, batch_size=batch_size)

    def check_batch(self, batch_size: int) -> None:
        """:func:`check_pipeline` for this strategy's layout."""
        microbatches = cast(_Pipelined, self.config).microbatches
        check_pipeline(dp=self.dims.dp, pp=self.dims.pp, microbatches=microbatches, batch_size=batch_size)

    def make_runner(self, module: nn.Module, *, stage_index: int, group: dist.ProcessGroup | None) -> StageRunner:
        """This rank's pipeline stage of ``module`` on the configured schedule."""
        c = cast(_Pipelined, self.config)
        if self.dims.pp > 1 and needs_host_staging(self.ctx.backend, self.ctx.device):
            raise ConfigError(
                f"{self.dims.pp} pipeline stages pass activations with send/recv, which gloo does on CPU tensors only, "
                f"not on {self.ctx.device.type}; give each stage its own GPU with --backend nccl, or use --device cpu"
            )
        return StageRunner(
            module,
            stage_index=stage_index,
            num_stages=self.dims.pp,
            group=group,
            microbatches=c.microbatches,
            schedule=c.schedule,
            device=self.ctx.device,
        )

    def reduce_loss(self, share: float, idle: float, runner: StageRunner | None) -> float:
        """Sum this rank's ``share`` of the loss over the world and, with a ``runner``, record the bubble.

        One all-reduce brings the last stages' losses and every rank's idle fraction to all ranks.
        """
        loss_sum, idle_sum = sum_across_world([share, idle / self.ctx.world_size], self.ctx.device)
        if runner is not None:
            self.last_metrics = {"bubble": idle_sum, "bubble_formula": runner.bubble_formula()}
        return float(loss_sum)

    def step_metrics(self) -> dict[str, float]:
        """The last step's measured bubble (mean over ranks of idle / step time) and (p - 1) / (m + p - 1)."""
        return dict(self.last_metrics)

    # -- world-size independent checkpoints ---------------------------------------------------------------

    def holds_state(self) -> bool:
        """Whether this rank sends its layers at a checkpoint (one rank per stage: the first dp replica's)."""
        return self.dims.coords(self.ctx.rank)[MeshAxis.DP] == 0

    def gathered(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The full tensor ``name`` of which this rank holds ``t`` (a collective under tensor parallelism)."""
        return t

    def slice_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``name``: the inverse of :meth:`gathered`."""
        return full

    def owned_state(self) -> dict[str, Any]:
        """This rank's layers' ``{"model", "momentum"}`` at full size, or ``{}`` if another rank sends them.
        Every rank calls it (:meth:`gathered` may be a collective)."""
        from fedge.plugins.train.base import sgd_state

        own = sgd_state(self.model, self.optimizer)  # type: ignore[attr-defined]
        full = {kind: {k: self.gathered(k, t.detach()) for k, t in part.items()} for kind, part in own.items()}
        if not self.holds_state():
            return {}
        return {kind: {k: t.cpu().clone() for k, t in part.items()} for kind, part in full.items()}

    def global_state(self) -> dict[str, Any]:
        import torch.distributed as dist

        parts: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(parts, self.owned_state())
        merged: dict[str, Any] = {"model": {}, "momentum": {}}
        for part in parts:
            for kind, into in merged.items():
                into.update(part.get(kind, {}))
        return merged

    def load_global_state(self, state: dict[str, Any], *, step: int) -> None:
        model, optimizer = self.model, self.optimizer  # type: ignore[attr-defined]
        model.load_state_dict({k: self.slice_of(k, state["model"][k]) for k in model.state_dict()})
        for name, p in model.named_parameters():
            buf = self.slice_of(name, state["momentum"][name])
            optimizer.state[p]["momentum_buffer"] = buf.detach().clone().to(p.device)

