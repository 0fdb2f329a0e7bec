"""Single-process training and evaluation on arrays: the local step of federated clients and the
reference that every distributed strategy must match."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate", "train_epochs"]


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def train_epochs(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    proximal_mu: float = 0.0,
    device: torch.device | str = "cpu",
) -> float:
    """Train ``model`` in place with SGD for ``epochs`` passes over (x, y); returns the mean loss.

    ``proximal_mu`` > 0 adds FedProx's (mu/2)·||w - w_start||² term, w_start being the weights on entry.
    ``device``: where to train; the model is moved there (and stays), the data travels there once.
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty partition")
    model.to(device)
    dtype = _param_dtype(model)
    xt = torch.as_tensor(x, dtype=dtype).to(device)
    yt = torch.as_tensor(y, dtype=torch.long).to(device)
    start = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen).to(device)
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            if start:
                loss = loss + proximal_mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start))
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
    return total / count


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on (x, y)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    dtype = _param_dtype(model)
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i : i + batch_size], dtype=dtype)
        yb = torch.as_tensor(y[i : i + batch_size], dtype=torch.long)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(x), correct / len(x)
