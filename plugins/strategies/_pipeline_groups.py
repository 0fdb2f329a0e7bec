"""Process groups for a ``ParallelDims`` layout, and the collectives both model-parallel strategies share."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fedge.parallel import MeshAxis, ParallelDims

__all__ = ["allreduce_grads", "gather_to_rank0", "make_groups", "sum_across_world"]


def make_groups(dims: ParallelDims, rank: int) -> dict[MeshAxis, dist.ProcessGroup | None]:
    """This rank's group along each axis; None for an axis that spans the whole world (the default group).

    Every rank creates every group, in the same order, because ``new_group`` is collective.
    """
    mine: dict[MeshAxis, dist.ProcessGroup | None] = {}
    for axis in MeshAxis:
        if dims.size(axis) == dims.product:
            mine[axis] = None
            continue
        for ranks in dims.groups(axis):
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine[axis] = group
    return mine


def sum_across_world(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over every rank, in one all-reduce."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_to_rank0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Merge every rank's (partial) state dict on rank 0; None elsewhere. Collective over the world."""
    parts: list[dict[str, torch.Tensor]] | None = (
        [{} for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    )
    dist.gather_object({k: v.detach().cpu() for k, v in state.items()}, parts, dst=0)
    if parts is None:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def allreduce_grads(params: list[nn.Parameter], *, group: dist.ProcessGroup | None, size: int) -> None:
    """Average the gradients of ``params`` across ``group`` in one flat all-reduce."""
    if size <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
