"""The typed settings of a federated run (``fedge fl run``), read from TOML and flags.

Standard library only: the CLI and the process supervisor import it without torch or flwr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedge.config import PartitionConfig, from_mapping, load_toml, merge, parse_partition, to_mapping
from fedge.plugins.fl.flower_internals import DEFAULT_POLL_S, check_poll_s
from fedge.plugins.fl.privacy import PrivacyConfig

__all__ = ["FAULTS", "FlConfig", "load_config"]

FAULTS = ("nan", "inf", "shape", "noise", "crash")
"""Fault kinds a client can be told to inject (testing robustness): NaN / Inf / wrongly shaped update, a
huge random (Byzantine) update, or a crash (its SuperNode is killed when it is asked to train)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FlConfig:
    """One federated run: data, model, federation size, aggregation and transport settings."""

    dataset: str = "digits"
    """Dataset plugin (``fedge plugins --kind dataset``)."""
    dataset_options: dict[str, Any] = field(default_factory=dict)
    """Options of the dataset plugin (its Config fields)."""
    model: str = "cnn"
    """Model plugin (``fedge plugins --kind model``)."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """Options of the model plugin (its Config fields)."""
    clients: int = 5
    """Number of SuperNodes (clients); each holds one partition of the training set."""
    rounds: int = 5
    """Federated rounds (Flower's ``num_rounds``)."""
    aggregator: str = "fedavg"
    """Aggregator plugin: a wrapped Flower strategy (``fedge plugins --kind aggregator``)."""
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    """Options of the aggregator plugin (its Config fields)."""
    partition: str = "dirichlet:0.5"
    """How the training set is split: ``iid``, ``dirichlet:ALPHA`` or ``shards:K``."""
    local_epochs: int = 5
    """Epochs each client trains on its partition per round."""
    batch_size: int = 16
    """Client mini-batch size."""
    lr: float = 0.05
    """Client SGD learning rate (momentum 0.9)."""
    fraction_train: float = 1.0
    """Share of connected clients sampled per round (Flower's ``fraction_train``)."""
    min_clients: int = 0
    """Clients that must be connected before the first round starts (up to ``startup_timeout_s``); 0 means all
    ``clients``. Later rounds start with the clients Flower lists as online."""
    round_timeout_s: float = 120.0
    """Seconds the server waits for replies in a round; late or dead clients are dropped from that round, and
    later rounds do not wait for them until they answer again. The first round a server runs waits at least
    ``startup_timeout_s`` (clients start cold)."""
    startup_timeout_s: float = 120.0
    """Seconds to wait for the SuperLink, the SuperNodes and the ServerApp to come up."""
    tls: bool = False
    """Encrypt SuperLink traffic with a development CA and certificate made for this run."""
    auth: bool = False
    """SuperNode authentication: only nodes whose public keys were registered may join (implies ``tls``)."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Differential privacy and secure aggregation (:mod:`fedge.plugins.fl.privacy`)."""
    warm_workers: bool = True
    """Give each SuperNode a warm worker that keeps torch loaded between rounds (the ClientApp process Flower
    starts per message then skips importing torch); false trains inside the ClientApp process."""
    supernode_poll_s: float = DEFAULT_POLL_S
    """Seconds an idle SuperNode waits before asking the SuperLink again for a message (Flower 1.39 hard-codes
    3 s; fedge starts Flower's SuperNode with this one sleep shortened, see ``fedge.plugins.fl.flower_internals``)."""
    heterogeneity: str = ""
    """Client speeds drawn per client: ``lognormal:SIGMA`` gives client i the slowdown exp(|N(0, SIGMA)|) (seeded);
    empty means all equal. See ``client_profiles`` for exact per-client settings."""
    client_profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-client profiles by partition id (TOML table): ``slowdown`` (>= 1), ``local_epochs``, ``dropout``
    (probability of sitting out a round it was sampled for), e.g. ``{"0" = {slowdown = 4, dropout = 0.2}}``."""
    engine: Literal["deployment", "simulation"] = "deployment"
    """Flower runtime: ``deployment`` (a SuperLink and SuperNode processes over gRPC) or ``simulation``
    (Flower's Simulation Engine on Ray: virtual clients, thousands on one machine). Same apps either way."""
    client_cpus: float = 1.0
    """Simulation: CPUs Ray reserves per virtual client (how many train at once = cores / this)."""
    client_gpus: float = 0.0
    """Simulation: GPUs (or a fraction of one) Ray reserves per virtual client."""
    ray_address: str = ""
    """Simulation: HOST:PORT of a running Ray cluster to use; empty starts a local Ray for the run."""
    seed: int = 0
    """Seed of the partition, model initialisation and client shuffling."""
    faults: dict[str, str] = field(default_factory=dict)
    """Fault injection for robustness tests: partition id -> one of nan, inf, shape, noise."""

    def __post_init__(self) -> None:
        if isinstance(self.privacy, Mapping):  # FlConfig(**cfg.to_mapping()) gives the table back as a dict
            object.__setattr__(self, "privacy", from_mapping(PrivacyConfig, self.privacy, where="fl.privacy"))
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.local_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("local_epochs and batch_size must be >= 1 and lr > 0")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        if not 0 <= self.min_clients <= self.clients:
            raise ValueError(f"min_clients must be between 0 and clients ({self.clients}), got {self.min_clients}")
        if self.round_timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("round_timeout_s and startup_timeout_s must be > 0")
        check_poll_s(self.supernode_poll_s)
        if self.clients * self.fraction_train < 1:
            raise ValueError(
                f"fraction_train {self.fraction_train} of {self.clients} clients samples nobody; "
                f"raise it to at least {1 / self.clients:.4g}"
            )
        if self.client_cpus <= 0 or self.client_gpus < 0:
            raise ValueError(f"client_cpus must be > 0 and client_gpus >= 0, got {self.client_cpus} and {self.client_gpus}")
        if self.ray_address and self.engine != "simulation":
            raise ValueError("ray_address is for engine = simulation; add --engine simulation")
        self._check_profiles()
        split = self.partition_config  # raises ConfigError on a bad spec
        if not math.isfinite(split.alpha):
            raise ValueError(f"partition {self.partition!r}: ALPHA must be a finite number > 0, e.g. dirichlet:0.5")
        for pid, fault in self.faults.items():
            if fault not in FAULTS or not str(pid).isdigit() or int(pid) >= self.clients:
                raise ValueError(
                    f"faults must map a partition id < {self.clients} to one of {', '.join(FAULTS)}; got {pid}={fault}"
                )

    def _check_profiles(self) -> None:
        from fedge.plugins.fl.profiles import ClientProfile, parse_heterogeneity

        parse_heterogeneity(self.heterogeneity)
        for pid, settings in self.client_profiles.items():
            if not str(pid).isdigit() or int(pid) >= self.clients or not isinstance(settings, Mapping):
                raise ValueError(f"client_profiles must map a partition id < {self.clients} to a table; got {pid!r}")
            unknown = set(settings) - {"slowdown", "local_epochs", "dropout"}
            if unknown:
                raise ValueError(f"client_profiles.{pid}: unknown setting {min(unknown)}; valid: dropout, local_epochs, slowdown")
            ClientProfile(**settings)

    @property
    def partition_config(self) -> PartitionConfig:
        """The ``partition`` setting, parsed (the one place it is)."""
        return parse_partition(self.partition, seed=self.seed)

    @property
    def num_sampled(self) -> int:
        """Clients a round samples when all are connected (Flower's ``int(n * fraction_train)``, at least 1)."""
        return max(1, int(self.clients * self.fraction_train))

    @property
    def required_clients(self) -> int:
        """Connected clients the first round waits for."""
        return self.min_clients or self.clients

    @property
    def secure(self) -> bool:
        return self.tls or self.auth

    def to_mapping(self) -> dict[str, Any]:
        return to_mapping(self)  # type: ignore[no-any-return]


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> FlConfig:
    """The run config: the TOML file (top level or its ``[fl]`` table), with ``overrides`` (flags) laid over it.

    An override that is None counts as not given (a flag the user left out), so callers pass every flag.

    Raises:
        ConfigError: unknown key, wrong type or invalid value (one line, naming the key).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = load_toml(path)
        raw = dict(raw.get("fl", raw))
    return from_mapping(FlConfig, merge(raw, overrides or {}), where="fl")
