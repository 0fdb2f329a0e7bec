"""Megatron-LM's tensor-parallel pieces: the conjugate f/g operators and the column/row-parallel split.

f (``copy_to_tp``) is the identity forward and an all-reduce backward; g (``reduce_from_tp``) is the
reverse. A transformer sublayer ``x -> B(act(A x))`` becomes ``g(B_rows(act(A_cols(f(x)))))``: one
all-reduce forward (g) and one backward (f) per attention and per MLP (Shoeybi et al. 2019, fig. 3).

Sharding keeps module names, so the sharded model's ``state_dict`` has the single-process keys with
sliced tensors; ``shard_dims`` says along which dim each one was sliced, to gather it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fedge.errors import ConfigError

__all__ = [
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tp",
    "gather_tp_state",
    "gather_tp_tensor",
    "parallelize_tp",
    "reduce_from_tp",
    "tp_slice",
]


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce (sum) forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Megatron's f operator (``group`` None: the default group)."""
    return cast(torch.Tensor, _CopyToTP.apply(x, group))  # type: ignore[no-untyped-call]


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Megatron's g operator (``group`` None: the default group)."""
    return cast(torch.Tensor, _ReduceFromTP.apply(x, group))  # type: ignore[no-untyped-call]


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split across the TP group; sums the partial outputs (g), then adds the bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # (out, in / tp)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features_local={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class VocabParallelEmbedding(nn.Module):
    """An embedding whose vocabulary rows are split across the TP group; ids outside this rank's rows
    look up zeros, and g sums the partial lookups (Megatron-LM's VocabParallelEmbedding)."""

    def __init__(self, emb: nn.Embedding, rank: int, size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        rows = emb.num_embeddings // size
        self.start, self.end, self.group = rank * rows, (rank + 1) * rows, group
        self.weight = nn.Parameter(emb.weight.detach()[self.start : self.end].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        out = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


def _column_shard(lin: nn.Linear, rank: int, size: int) -> nn.Linear:
    out_local = lin.out_features // size
    rows = slice(rank * out_local, (rank + 1) * out_local)
    new = nn.Linear(
        lin.in_features, out_local, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows])
    return new


def _row_shard(lin: nn.Linear, rank: int, size: int, group: dist.ProcessGroup | None) -> RowParallelLinear:
    in_local = lin.in_features // size
    cols = slice(rank * in_local, (rank + 1) * in_local)
    bias = lin.bias.detach().clone() if lin.bias is not None else None
    return RowParallelLinear(lin.weight.detach()[:, cols].clone(), bias, group)


def _is_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q", "k", "v", "proj")) and hasattr(m, "num_heads")


def _is_mlp(m: nn.Module) -> bool:
    return isinstance(getattr(m, "fc", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)


def _enter_tp(group: dist.ProcessGroup | None) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    """A forward pre-hook applying f to the sublayer's input."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (copy_to_tp(args[0], group), *args[1:])

    return hook


def parallelize_tp(
    model: nn.Module, *, group: dist.ProcessGroup | None, rank: int, size: int, vocab_parallel: bool = False
) -> dict[str, int]:
    """Shard every attention (q, k, v, proj + ``num_heads``) and MLP (fc, proj) sublayer of ``model`` in place.

    q/k/v and fc become column-parallel (output rows split; for q/k/v that is whole heads, since heads are
    contiguous slices of the projection), proj row-parallel; f is applied to each sublayer's input. With
    ``vocab_parallel`` every ``nn.Embedding`` is split by vocabulary rows too.

    Returns:
        ``{state_dict key: dim it is split along}`` for every sharded tensor.

    Raises:
        ConfigError: no sublayer to shard, or heads / hidden width not divisible by ``size``.
    """
    dims: dict[str, int] = {}
    if size == 1:
        return dims
    for name, m in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if _is_attention(m):
            dims.update(_shard_attention(m, name, prefix, group=group, rank=rank, size=size))
        elif _is_mlp(m):
            dims.update(_shard_mlp(m, name, prefix, group=group, rank=rank, size=size))
    if vocab_parallel:
        dims.update(_shard_embeddings(model, group=group, rank=rank, size=size))
    if not dims:
        raise ConfigError(
            "megatron found nothing to split: it needs attention (q, k, v, proj Linear + num_heads) or MLP "
            "(fc, proj Linear) sublayers, like the tiny-gpt model's; use tp=1 or another strategy"
        )
    return dims


def _shard_attention(
    m: nn.Module, name: str, prefix: str, *, group: dist.ProcessGroup | None, rank: int, size: int
) -> dict[str, int]:
    if m.num_heads % size:
        raise ConfigError(
            f"tp={size} must divide the attention heads ({m.num_heads}) of {name or 'the model'}; choose tp from its divisors"
        )
    dims = {}
    for n in ("q", "k", "v"):
        setattr(m, n, _column_shard(getattr(m, n), rank, size))
        dims[f"{prefix}{n}.weight"] = 0
        if getattr(m, n).bias is not None:
            dims[f"{prefix}{n}.bias"] = 0
    m.proj = _row_shard(m.proj, rank, size, group)
    dims[f"{prefix}proj.weight"] = 1
    m.num_heads //= size
    m.register_forward_pre_hook(_enter_tp(group))
    return dims


def _shard_mlp(
    m: nn.Module, name: str, prefix: str, *, group: dist.ProcessGroup | None, rank: int, size: int
) -> dict[str, int]:
    if m.fc.out_features % size:
        raise ConfigError(
            f"tp={size} must divide the MLP width ({m.fc.out_features}) of {name or 'the model'}; choose tp from its divisors"
        )
    m.fc = _column_shard(m.fc, rank, size)
    dims = {f"{prefix}fc.weight": 0}
    if m.fc.bias is not None:
        dims[f"{prefix}fc.bias"] = 0
    m.proj = _row_shard(m.proj, rank, size, group)
    dims[f"{prefix}proj.weight"] = 1
    m.register_forward_pre_hook(_enter_tp(group))
    return dims


def _shard_embeddings(model: nn.Module, *, group: dist.ProcessGroup | None, rank: int, size: int) -> dict[str, int]:
    dims = {}
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.Embedding):
                if child.num_embeddings % size:
                    raise ConfigError(
                        f"tp={size} must divide the vocabulary ({child.num_embeddings}) for vocab_parallel; "
                        "choose tp from its divisors or set vocab_parallel=false"
                    )
                setattr(m, child_name, VocabParallelEmbedding(child, rank, size, group))
                dims[f"{name}.{child_name}.weight" if name else f"{child_name}.weight"] = 0
    return dims


def gather_tp_tensor(t: torch.Tensor, dim: int, *, group: dist.ProcessGroup | None, size: int) -> torch.Tensor:
    """This rank's slice of a tensor split along ``dim`` across the TP group, gathered to full size (collective)."""
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def tp_slice(t: torch.Tensor, dim: int, *, rank: int, size: int) -> torch.Tensor:
    """TP rank ``rank``'s slice of a full tensor, as :func:`parallelize_tp` cut it (equal contiguous parts)."""
    return t.chunk(size, dim=dim)[rank]


def gather_tp_state(
    module: nn.Module, dims: dict[str, int], *, group: dist.ProcessGroup | None, size: int
) -> dict[str, torch.Tensor]:
    """The module's state_dict with every sharded tensor gathered to full size (collective over ``group``)."""
    state = {}
    for key, t in module.state_dict().items():
        t = t.detach()
        if key in dims and size > 1:
            t = gather_tp_tensor(t, dims[key], group=group, size=size)
        state[key] = t.cpu().clone()
    return state
