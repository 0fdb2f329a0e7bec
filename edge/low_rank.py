"""Low-rank decomposition by truncated SVD: each Linear layer becomes two thinner ones, each Conv2d a k x k conv
into ``rank`` channels followed by a 1x1 conv, so the model needs fewer weights and still exports through
litert-torch (FULLY_CONNECTED and CONV_2D ops only).

Example::

    small, ranks = factorize(model, rank_fraction=0.25)   # a copy; ``model`` is left as it was
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["factorize", "num_params"]


def _split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` with ``second @ first`` the best rank-``rank`` approximation of ``weight`` (out, in)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    # The singular values are shared as square roots, so both factors have the same scale (better for int8).
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


def _rank(out_dim: int, in_dim: int, fraction: float) -> int | None:
    """The rank to keep, or None when factoring would not save weights."""
    rank = max(1, round(fraction * min(out_dim, in_dim)))
    return rank if rank * (out_dim + in_dim) < out_dim * in_dim else None


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    return (value[0], value[-1])


def _linear(layer: nn.Linear, fraction: float) -> nn.Sequential | None:
    rank = _rank(layer.out_features, layer.in_features, fraction)
    if rank is None:
        return None
    first, second = _split(layer.weight, rank)
    down = nn.Linear(layer.in_features, rank, bias=False)
    up = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        down.weight.copy_(first)
        up.weight.copy_(second)
        if layer.bias is not None and up.bias is not None:
            up.bias.copy_(layer.bias)
    return nn.Sequential(down, up)


def _conv(layer: nn.Conv2d, fraction: float) -> nn.Sequential | None:
    if layer.groups != 1:  # grouped and depthwise convs are thin already
        return None
    cout, cin, kh, kw = layer.weight.shape
    rank = _rank(cout, cin * kh * kw, fraction)
    if rank is None:
        return None
    first, second = _split(layer.weight.reshape(cout, -1), rank)
    spatial = nn.Conv2d(
        cin,
        rank,
        (kh, kw),
        stride=_pair(layer.stride),
        padding=layer.padding if isinstance(layer.padding, str) else _pair(layer.padding),
        dilation=_pair(layer.dilation),
        bias=False,
        padding_mode=layer.padding_mode,
    )
    mix = nn.Conv2d(rank, cout, 1, bias=layer.bias is not None)
    with torch.no_grad():
        spatial.weight.copy_(first.reshape(rank, cin, kh, kw))
        mix.weight.copy_(second.reshape(cout, rank, 1, 1))
        if layer.bias is not None and mix.bias is not None:
            mix.bias.copy_(layer.bias)
    return nn.Sequential(spatial, mix)


def _factor(layer: nn.Module, fraction: float) -> nn.Sequential | None:
    if type(layer) is nn.Linear:
        return _linear(layer, fraction)
    if type(layer) is nn.Conv2d:
        return _conv(layer, fraction)
    return None


def factorize(model: nn.Module, rank_fraction: float) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``model`` with every Linear and Conv2d replaced by its truncated-SVD factors.

    Each layer keeps ``rank_fraction`` of its full rank (at least 1); a layer whose factors would need as many
    weights as it has stays whole, and so does the last Linear (the classifier: its rank is bounded by the
    number of classes, and cutting it costs the most accuracy for the fewest weights).

    Returns:
        The factorized copy (no longer what its model plugin builds), and the kept rank per replaced layer's name.

    Raises:
        ValueError: ``rank_fraction`` is not in (0, 1).
    """
    if not 0.0 < rank_fraction < 1.0:
        raise ValueError(f"rank_fraction must be between 0 and 1, got {rank_fraction}")
    result = copy.deepcopy(model)
    linears = [name for name, m in result.named_modules() if type(m) is nn.Linear]
    classifier = linears[-1] if linears else None
    ranks: dict[str, int] = {}
    for name, layer in list(result.named_modules()):
        if name == classifier or not name:
            continue
        replacement = _factor(layer, rank_fraction)
        if replacement is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = result.get_submodule(parent_name) if parent_name else result
        setattr(parent, child, replacement)
        first = replacement[0]
        assert isinstance(first, (nn.Linear, nn.Conv2d))
        ranks[name] = int(first.weight.shape[0])  # out_features, or out_channels: the rank kept
    return result, ranks


def num_params(model: nn.Module) -> int:
    """Number of parameters: what its int8 weights take in bytes, a lower bound of the int8 file's size."""
    return sum(math.prod(p.shape) for p in model.parameters())
