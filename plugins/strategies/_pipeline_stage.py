"""Layer split and one pipeline stage on torch.distributed.pipelining, shared by ``pipeline`` and ``megatron``.

fedge adds only what torch's stage/schedule machinery lacks: a balanced contiguous split of an
``nn.Sequential`` (by parameter count or measured time), per-stage activation recomputation, stage
modules that keep the single-process ``state_dict`` keys, and busy-time accounting for the bubble.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from fedge.errors import ConfigError

__all__ = ["SCHEDULES", "StageModule", "StageRunner", "balanced_split", "layer_costs", "resolve_split"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def balanced_split(costs: Sequence[float], num_stages: int) -> list[int]:
    """Layers per stage for the contiguous split of ``costs`` that minimises the costliest stage.

    Exact dynamic programme (layers are few): O(layers^2 * stages).
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[s][i]: the least max-stage cost splitting the first i layers into s stages; cut[s][i] the last cut.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, i = [], n
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def layer_costs(layers: Sequence[nn.Module], sample: torch.Tensor, *, repeats: int = 3) -> list[float]:
    """Measured forward + backward seconds of each layer on ``sample`` (the minimum of ``repeats`` runs)."""
    costs = [float("inf")] * len(layers)
    for _ in range(repeats + 1):  # the first pass warms up
        h = sample
        for i, layer in enumerate(layers):
            inp = h.detach().requires_grad_(h.is_floating_point())
            t0 = time.perf_counter()
            out = layer(inp)
            out.float().sum().backward()
            costs[i] = min(costs[i], time.perf_counter() - t0)
            h = out.detach()
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return costs


def resolve_split(
    layers: Sequence[nn.Module],
    *,
    num_stages: int,
    split: Sequence[int],
    balance: str,
    sample: torch.Tensor | None,
    flag: str = "stages",
) -> list[int]:
    """Layers per stage: ``split`` if given, else balanced by ``balance`` ("params" or "time").

    Raises:
        ConfigError: more stages than layers, or an explicit split that does not fit the model.
    """
    n = len(layers)
    if num_stages > n:
        raise ConfigError(f"{flag}={num_stages} is more than the model's {n} top-level layers; use at most {n} stages")
    if split:
        if len(split) != num_stages or sum(split) != n or min(split) < 1:
            raise ConfigError(
                f"split {','.join(map(str, split))} must give each of the {num_stages} stages >= 1 layer and "
                f"sum to the model's {n} layers"
            )
        return list(split)
    if balance == "time":
        if sample is None:
            raise ConfigError(
                "balance=time needs a model built by fedge (it knows its input shape); use balance=params"
            )
        costs = layer_costs(layers, sample)
    else:
        costs = [max(1, sum(p.numel() for p in layer.parameters())) for layer in layers]
    return balanced_split(costs, num_stages)


class StageModule(nn.Sequential):
    """Consecutive layers of the full model under their original names, so ``state_dict`` keys match it."""

    @classmethod
    def of(cls, model: nn.Sequential, sizes: Sequence[int], index: int) -> StageModule:
        """Stage ``index`` of ``model`` split into consecutive runs of ``sizes`` layers."""
        lo = sum(sizes[:index])
        names = list(model._modules)
        return cls(OrderedDict((names[i], model[i]) for i in range(lo, lo + sizes[index])))


class _TimedStage(PipelineStage):
    """A PipelineStage that adds up the seconds spent computing (forward and backward chunks)."""

    busy_s = 0.0

    def forward_one_chunk(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.busy_s += time.perf_counter() - t0

    def backward_one_chunk(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.busy_s += time.perf_counter() - t0


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


class StageRunner:
    """This rank's stage of a pipeline and its schedule; ``step`` runs one global batch through it.

    Args:
        module: this stage's layers.
        stage_index, num_stages: where the stage sits.
        group: the pipeline group (one rank per stage, ordered by stage).
        microbatches: micro-batches per step.
        schedule: "gpipe" or "1f1b".
        device: the stage's device.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        stage_index: int,
        num_stages: int,
        group: dist.ProcessGroup | None,
        microbatches: int,
        schedule: str,
        device: torch.device,
    ) -> None:
        self.module = module
        self.stage = _TimedStage(module, stage_index, num_stages, device, group=group)
        self.schedule = SCHEDULES[schedule](self.stage, microbatches, loss_fn=_cross_entropy, scale_grads=True)
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.num_stages, self.microbatches = num_stages, microbatches

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Forward and backward of (x, y) in micro-batches; gradients are those of the mean loss.

        Returns:
            (the mean loss on the last stage, else 0.0; the fraction of the step this stage sat idle).
        """
        if len(x) % self.microbatches:
            raise ConfigError(
                f"microbatches={self.microbatches} does not divide the batch of {len(x)} rows; "
                f"choose a batch size that is a multiple of {self.microbatches}"
            )
        losses: list[torch.Tensor] = []
        args = (x,) if self.is_first else ()
        self.stage.busy_s = 0.0
        t0 = time.perf_counter()
        if self.is_last:
            self.schedule.step(*args, target=y, losses=losses, return_outputs=False)
        else:
            self.schedule.step(*args, return_outputs=False)
        step_s = time.perf_counter() - t0
        loss = float(torch.stack(losses).detach().mean()) if losses else 0.0
        return loss, max(0.0, 1.0 - self.stage.busy_s / step_s) if step_s > 0 else 0.0

    def bubble_formula(self) -> float:
        """GPipe's and 1F1B's ideal bubble fraction, (p - 1) / (m + p - 1)."""
        p, m = self.num_stages, self.microbatches
        return (p - 1) / (m + p - 1)
