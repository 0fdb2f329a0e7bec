"""A third-party ``aggregator`` plugin: FedAvg whose client updates are norm-clipped, with an adaptive clip.

Each client's update (its model minus the global model) is scaled down to at most ``clipping_norm`` in L2
norm before Flower's FedAvg averages them, so one client with a huge update cannot drag the model away. The
norm adapts each round towards the ``target_quantile`` of the update norms (the geometric rule of Andrew et
al., "Differentially Private Learning with Adaptive Clipping", 2021). The clip is server state: the plugin
declares it in ``checkpoint_state``, so ``fedge fl run --resume`` continues with it. Use::

    pip install ./examples/custom_plugin
    fedge fl run --aggregator clipped-fedavg -O clipping_norm=5 --clients 2 --rounds 2
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedge.plugins.aggregators import Sampling, StateKind
from fedge.registry import plugin


class AdaptiveClipFedAvg(FedAvg):
    """Flower's FedAvg on client updates clipped to ``clipping_norm``, which adapts every round."""

    def __init__(self, *, clipping_norm: float, target_quantile: float, clip_lr: float, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clipping_norm = clipping_norm
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.num_clipped = 0
        """Updates clipped so far (server state, like the norm)."""
        self._global: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        norms = [self._clip(msg) for msg in replies if not msg.has_error()]
        if norms:
            within = float(np.mean([n <= self.clipping_norm for n in norms]))
            self.clipping_norm *= math.exp(-self.clip_lr * (within - self.target_quantile))
        return super().aggregate_train(server_round, replies)

    def _clip(self, msg: Message) -> float:
        key, record = next(iter(msg.content.array_records.items()))
        arrays = {k: v.numpy() for k, v in record.items()}
        deltas = {k: a - self._global[k] for k, a in arrays.items()}
        norm = math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in deltas.values()))
        if norm > self.clipping_norm:
            self.num_clipped += 1
            scale = self.clipping_norm / norm
            clipped = {k: (self._global[k] + d * scale).astype(arrays[k].dtype) for k, d in deltas.items()}
            msg.content[key] = ArrayRecord({k: Array(v) for k, v in clipped.items()})
        return norm


@plugin("aggregator", "clipped-fedavg")
class ClippedFedAvg:
    """FedAvg of norm-clipped client updates with an adaptive clip (state kept across --resume)."""

    checkpoint_state: ClassVar[Mapping[str, StateKind]] = {"clipping_norm": "value", "num_clipped": "value"}

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        clipping_norm: float = 10.0
        """Initial L2 bound of a client's update."""
        target_quantile: float = 0.5
        """Share of updates the clip should leave unclipped; the clip moves towards it each round."""
        clip_lr: float = 0.2
        """How fast the clip adapts (0 keeps it fixed)."""

        def __post_init__(self) -> None:
            if self.clipping_norm <= 0:
                raise ValueError(f"clipping_norm must be > 0, got {self.clipping_norm}")
            if not 0.0 <= self.target_quantile <= 1.0:
                raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}")
            if self.clip_lr < 0:
                raise ValueError(f"clip_lr must be >= 0, got {self.clip_lr}")

    @staticmethod
    def build(config: Config, sampling: Sampling) -> AdaptiveClipFedAvg:
        return AdaptiveClipFedAvg(
            clipping_norm=config.clipping_norm,
            target_quantile=config.target_quantile,
            clip_lr=config.clip_lr,
            **sampling.kwargs(),
        )
