"""The resolved settings of one ``fedge train`` job (stdlib only: the CLI imports it before torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["NODE_SETTINGS", "TrainConfig", "parse_nnodes"]


def parse_nnodes(spec: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:4"`` -> (1, 4). Raises ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", spec)
    if not m:
        raise ValueError(f"nnodes must be N or MIN:MAX (e.g. 2 or 1:4), got {spec!r}")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if not 1 <= lo <= hi:
        raise ValueError(f"nnodes needs 1 <= MIN <= MAX, got {spec!r}")
    return lo, hi


# Settings a node may set for itself: how it joins (and restarts), and where its data lies (the data
# itself is compared instead).
NODE_SETTINGS = frozenset(
    {"nproc", "nnodes", "rdzv_endpoint", "rdzv_id", "rdzv_timeout_s", "rdzv_last_call_s", "max_restarts", "dataset_options"}
)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """One cluster-training job: what to train, how long, on how many processes, with which strategy."""

    strategy: str = "allreduce"
    """Strategy plugin name (``fedge plugins --kind strategy``)."""
    model: str = "mlp"
    """Model plugin name."""
    dataset: str = "digits"
    """Dataset plugin name."""
    steps: int = 100
    """Optimizer steps (each on one global batch)."""
    epochs: int | None = None
    """If set, train this many passes over the training set instead of ``steps``."""
    batch_size: int = 64
    """Global batch size: the samples of one step, summed over all data-parallel ranks."""
    seed: int = 0
    """Seed of the model initialisation and of the batch order."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: never)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    profile: bool = False
    """Write one torch.profiler trace per rank to ``traces/`` (tensorboard_trace_handler layout)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: NCCL when every local rank has a GPU, else gloo."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where tensors live: ``auto`` is CUDA with NCCL, else the CPU; ``cuda`` with gloo puts several ranks on
    fewer GPUs (NCCL refuses two ranks on one GPU)."""
    timeout_s: float = 120.0
    """Timeout of process-group creation and of every collective, in seconds."""
    nproc: int = 1
    """Processes per node."""
    nnodes: str = "1"
    """Nodes: N, or MIN:MAX for an elastic job."""
    rdzv_endpoint: str = ""
    """HOST:PORT of the c10d rendezvous (multi-node); empty: a standalone job on this machine."""
    rdzv_id: str = "fedge-train"
    """Rendezvous id; the same on every node of one job."""
    rdzv_timeout_s: float = 60.0
    """How long to wait for the rendezvous endpoint and the other nodes."""
    rdzv_last_call_s: float = 30.0
    """Elastic jobs (``nnodes`` MIN:MAX): once MIN nodes have joined, wait this long for more before training
    starts (torchrun's ``last_call_timeout``, whole seconds; added to ``rdzv_timeout_s`` for the join)."""
    max_restarts: int = 0
    """torchrun restarts of the worker group after a failure; each restart resumes from the last checkpoint."""
    fault_at: str = ""
    """Fault drill, ``RANK:STEP``: that rank kills itself (SIGKILL) before that step, on the first attempt only."""
    strategy_options: dict[str, Any] = field(default_factory=dict)
    """The strategy's Config fields (e.g. ``chunk_bytes``, ``mode``, ``lr``)."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """The model's Config fields."""
    dataset_options: dict[str, Any] = field(default_factory=dict)
    """The dataset's Config fields."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "nproc", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.checkpoint_every < 0 or self.max_restarts < 0:
            raise ValueError("checkpoint_every and max_restarts must be >= 0")
        if self.timeout_s <= 0 or self.rdzv_timeout_s <= 0 or self.rdzv_last_call_s <= 0:
            raise ValueError("timeouts must be > 0 seconds")
        if parse_nnodes(self.nnodes)[1] > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes {self.nnodes} spans several machines and needs --rdzv-endpoint HOST:PORT (rdzv_endpoint)"
            )
        if self.rdzv_endpoint and not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+", self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.rdzv_endpoint and not 1 <= int(self.rdzv_endpoint.rpartition(":")[2]) <= 65535:
            raise ValueError(f"rdzv_endpoint's port must be 1-65535, got {self.rdzv_endpoint!r}")
        if not re.fullmatch(r"[\w.-]+", self.rdzv_id):
            raise ValueError(f"rdzv_id takes letters, digits, '.', '_' and '-', got {self.rdzv_id!r}")
        if self.backend == "nccl" and self.device == "cpu":
            raise ValueError("backend nccl works on CUDA tensors only; use --device cuda (or auto), or --backend gloo")
        if self.fault_at and not re.fullmatch(r"\d+:\d+", self.fault_at):
            raise ValueError(f"fault_at must be RANK:STEP, got {self.fault_at!r}")

