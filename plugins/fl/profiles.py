"""Heterogeneous clients: per-client compute speed, local epochs and availability, in both engines.

Flower gives every simulated client the same resources and speed (its issue #7321); fedge makes stragglers
and dropouts something a study sets. A client's profile comes from the run's ``client_profiles`` table (by
partition id) over a generator (``heterogeneity = "lognormal:SIGMA"``: slowdown ``exp(|N(0, SIGMA)|)``, seeded by
the run's seed and the partition id, so every run and both engines give a client the same profile). The
ClientApp applies it (:func:`apply`): it trains its profile's local epochs, then waits until its compute
took ``slowdown`` times as long, and with probability ``dropout`` a round it drops out (no update).
Standard library and numpy only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DROPPED", "ClientProfile", "parse_heterogeneity", "profile_for"]

DROPPED = "dropped out of this round (availability profile)"
"""The reason a client that dropped out gives; the server counts it as dropped, not as a rejected update."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientProfile:
    """One client's compute speed, local epochs and availability."""

    slowdown: float = 1.0
    """Compute takes this many times as long (>= 1)."""
    local_epochs: int | None = None
    """Epochs per round; None keeps the run's ``local_epochs``."""
    dropout: float = 0.0
    """Probability the client drops out of a round it was sampled for, in [0, 1]."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slowdown) and self.slowdown >= 1.0):
            raise ValueError(f"client profile slowdown must be a finite number >= 1, got {self.slowdown}")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise ValueError(f"client profile local_epochs must be >= 1, got {self.local_epochs}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"client profile dropout must be in [0, 1], got {self.dropout}")


def parse_heterogeneity(spec: str) -> float:
    """The SIGMA of ``lognormal:SIGMA`` (0 for ``""``: every client as fast as the next).

    Raises:
        ValueError: any other spec, or a SIGMA that is not a finite number >= 0.
    """
    if not spec:
        return 0.0
    kind, _, arg = spec.partition(":")
    try:
        sigma = float(arg)
    except ValueError:
        sigma = float("nan")
    if kind != "lognormal" or not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"heterogeneity must be lognormal:SIGMA with a finite SIGMA >= 0 (e.g. lognormal:0.5); got {spec!r}")
    return sigma


def profile_for(partition_id: int, *, seed: int, heterogeneity: str, profiles: Mapping[str, Mapping[str, Any]]) -> ClientProfile:
    """The profile of client ``partition_id``: its ``profiles`` entry laid over the generator's draw."""
    sigma = parse_heterogeneity(heterogeneity)
    slowdown = float(np.exp(abs(np.random.default_rng([seed, partition_id]).normal(0.0, sigma)))) if sigma else 1.0
    given = dict(profiles.get(str(partition_id), {}))
    return ClientProfile(**{"slowdown": slowdown, **given})


def dropped_out(profile: ClientProfile, *, seed: int, partition_id: int, server_round: int) -> bool:
    """Whether the client sits this round out (the same draw on every run with this seed)."""
    if profile.dropout <= 0:
        return False
    return bool(np.random.default_rng([seed, partition_id, server_round, 7]).random() < profile.dropout)


def from_train_config(config: Mapping[str, Any], partition_id: int) -> ClientProfile:
    """The profile as the ClientApp reads it from the round's train config."""
    return profile_for(
        partition_id,
        seed=int(config["seed"]),
        heterogeneity=str(config.get("heterogeneity", "")),
        profiles=json.loads(str(config.get("client-profiles", "{}"))),
    )
