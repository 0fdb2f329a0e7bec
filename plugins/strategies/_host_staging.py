"""Point-to-point messages of CUDA tensors over gloo, through host memory.

gloo's send/recv hand the tensor's raw pointer to its TCP transport, which reads and writes host memory
only (PyTorch's backend table: no GPU send/recv on gloo; its all_reduce and broadcast do take CUDA
tensors). So a strategy that exchanges CUDA tensors point-to-point over gloo - several ranks sharing one
GPU, where NCCL refuses two ranks on a device - sends from and receives into a pinned host copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HostStage", "needs_host_staging"]


def needs_host_staging(backend: str, device: torch.device) -> bool:
    """True when send/recv of tensors on ``device`` must go through host memory on ``backend``."""
    return backend == "gloo" and device.type != "cpu"


class HostStage:
    """A reusable pinned host mirror of one device tensor: ``out`` copies device -> host, ``back`` host -> device."""

    def __init__(self) -> None:
        self.host: Tensor | None = None

    def mirror(self, t: Tensor) -> Tensor:
        """The host buffer for ``t`` (same shape and dtype), allocated once and kept across steps."""
        if self.host is None or self.host.shape != t.shape or self.host.dtype != t.dtype:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
        return self.host

    def out(self, t: Tensor) -> Tensor:
        """``t``'s values in the host buffer (waits for the copy: the transport reads it next)."""
        host = self.mirror(t)
        host.copy_(t)
        return host

    def back(self, t: Tensor) -> None:
        """Copy the host buffer into ``t``."""
        assert self.host is not None, "out() or mirror() comes first"
        t.copy_(self.host)
