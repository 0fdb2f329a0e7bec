"""Differential privacy and secure aggregation settings of a federated run, and DP on any aggregator.

Central DP wraps the aggregator's Flower strategy in Flower's own Message-API wrappers
(``DifferentialPrivacyServerSideFixedClipping``, ``...ClientSideFixedClipping`` and the adaptive variants);
client-side clipping and local DP run Flower's ``flwr.clientapp.mod`` mods (``fixedclipping_mod``,
``adaptiveclipping_mod``, ``LocalDpMod``) in fedge's ClientApp. :class:`PrivacyLedger` keeps the (ε, δ) spent
with Flower's RDP accountant (``flwr.supercore.privacy_accounting``, backed by Google's dp-accounting; install
``fedge[dp]``) and says when a run must stop at ``target_epsilon``.

The settings (:class:`PrivacyConfig`) are standard library only; flwr loads inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fedge.errors import ConfigError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.serverapp.strategy import Strategy

__all__ = [
    "MEAN_AGGREGATORS",
    "PrivacyConfig",
    "PrivacyLedger",
    "aggregates_by_mean",
    "check_privacy",
    "client_mod",
    "describe_spent",
    "train_config",
    "wrap_strategy",
]

logger = logging.getLogger(__name__)

MEAN_AGGREGATORS = ("FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad")
"""Flower strategies whose server step starts from the (weighted) mean of the client updates: the only ones that
SecAgg+ (which reveals only that mean) can feed, and whose DP release the mean-based RDP accounting covers
(FedAvgM's momentum and FedOpt's server optimizer are post-processing of the noisy mean)."""

WEIGHT_KEY = "dp-weight"
"""Metric every client sends as 1 under central DP: the mean is then unweighted, as DP-FedAvg's accounting assumes."""

_CONFIG_PREFIX = "privacy-"


@dataclass(frozen=True, kw_only=True, slots=True)
class PrivacyConfig:
    """Differential privacy and secure aggregation of a federated run (the ``[fl.privacy]`` table)."""

    dp: Literal["off", "central", "local"] = "off"
    """Differential privacy: central (the server adds Gaussian noise to the mean of clipped updates), local (each
    client clips its update and adds the noise itself before sending), or off."""
    clipping: Literal["fixed", "adaptive"] = "fixed"
    """Central DP clipping norm: fixed at ``clip``, or adaptive (starts at ``clip`` and follows the
    ``target_clipped_quantile`` of the update norms, Andrew et al. 2021)."""
    clip_on: Literal["server", "client"] = "server"
    """Where central DP clips each update: on the server, or on the clients (needed with ``secagg``)."""
    clip: float = 1.0
    """L2 norm each client's model update is clipped to (the initial norm with adaptive clipping)."""
    noise_multiplier: float = 1.0
    """Gaussian noise standard deviation as a multiple of ``clip`` (per client with local DP)."""
    delta: float = 1e-5
    """The δ at which ε is reported (and ``target_epsilon`` checked)."""
    target_epsilon: float | None = None
    """Privacy budget: the run stops before a round that would spend more (refuses to start if one round would)."""
    target_clipped_quantile: float = 0.5
    """Adaptive clipping: share of updates that should be clipped."""
    clip_norm_lr: float = 0.2
    """Adaptive clipping: learning rate of the clipping norm's geometric update."""
    clipped_count_stddev: float | None = None
    """Adaptive clipping: noise on the count of clipped updates; must exceed ``noise_multiplier`` / 2
    (default: Flower's sampled clients / 20)."""
    secagg: bool = False
    """Secure aggregation with Flower's SecAgg+: the server only learns the sum of the masked client updates."""
    secagg_num_shares: int | float = 1.0
    """SecAgg+ shares each client's secret key is split into: a count (> 2) or a share of the sampled clients."""
    secagg_reconstruction_threshold: int | float = 0.5
    """SecAgg+ shares needed to reconstruct a key: a count, or a share of ``secagg_num_shares``. A round survives
    clients lost mid-protocol as long as every client keeps this many live neighbours."""
    secagg_clipping_range: float = 8.0
    """SecAgg+ quantization: each weight is clipped to [-range, range] before it is quantized."""
    secagg_quantization_range: int = 4194304
    """SecAgg+ quantization levels (2**22): the aggregate is exact up to 2 * range / levels per weight."""
    secagg_max_weight: float = 1000.0
    """SecAgg+ largest client weight (its example count, 1 under DP); larger weights may overflow the masks."""
    secagg_timeout_s: float | None = None
    """Seconds each SecAgg+ stage waits for replies (default: the run's ``round_timeout_s``)."""

    def __post_init__(self) -> None:
        if self.clip <= 0:
            raise ValueError(f"privacy.clip must be > 0, got {self.clip}")
        if self.dp != "off" and self.noise_multiplier <= 0:
            raise ValueError(
                f"privacy.noise_multiplier must be > 0 with dp={self.dp} (0 is no privacy), got {self.noise_multiplier}"
            )
        if self.noise_multiplier < 0:
            raise ValueError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None:
            if self.target_epsilon <= 0:
                raise ValueError(f"privacy.target_epsilon must be > 0, got {self.target_epsilon}")
            if self.dp == "off":
                raise ValueError("privacy.target_epsilon needs dp = central or local (nothing is spent with dp off)")
        if not 0 <= self.target_clipped_quantile <= 1:
            raise ValueError(f"privacy.target_clipped_quantile must be in [0, 1], got {self.target_clipped_quantile}")
        if self.clipped_count_stddev is not None and self.clipped_count_stddev < 0:
            raise ValueError(f"privacy.clipped_count_stddev must be >= 0, got {self.clipped_count_stddev}")
        if self.clip_norm_lr <= 0:
            raise ValueError(f"privacy.clip_norm_lr must be > 0, got {self.clip_norm_lr}")
        if self.dp == "local" and self.clipping == "adaptive":
            raise ValueError("privacy.clipping = adaptive is central DP only; local DP clips at a fixed clip")
        if self.secagg and self.dp == "central" and self.clip_on == "server":
            raise ValueError(
                "secagg hides each update from the server, so the server cannot clip it: use clip_on = client "
                "(--clip-on client) with dp = central, or dp = local"
            )
        self._check_secagg()

    def _check_secagg(self) -> None:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if isinstance(shares, int) and not isinstance(shares, bool):
            if shares != 1 and shares <= 2:
                raise ValueError(f"privacy.secagg_num_shares as a count must be > 2, got {shares}")
        elif not 0 < shares <= 1:
            raise ValueError(f"privacy.secagg_num_shares as a share must be in (0, 1], got {shares}")
        if isinstance(threshold, int) and not isinstance(threshold, bool):
            if threshold < 2 and threshold != 1:
                raise ValueError(f"privacy.secagg_reconstruction_threshold as a count must be >= 2, got {threshold}")
            if isinstance(shares, int) and shares > 2 and threshold >= shares:
                raise ValueError(
                    f"privacy.secagg_reconstruction_threshold ({threshold}) must be below secagg_num_shares ({shares})"
                )
        elif not 0 < threshold <= 1:
            raise ValueError(f"privacy.secagg_reconstruction_threshold as a share must be in (0, 1], got {threshold}")
        if self.secagg_clipping_range <= 0 or self.secagg_max_weight <= 0:
            raise ValueError("privacy.secagg_clipping_range and secagg_max_weight must be > 0")
        if not 0 < self.secagg_quantization_range < 2**32:
            raise ValueError(
                f"privacy.secagg_quantization_range must be in (0, 2**32), got {self.secagg_quantization_range}"
            )
        if self.secagg_timeout_s is not None and self.secagg_timeout_s <= 0:
            raise ValueError(f"privacy.secagg_timeout_s must be > 0, got {self.secagg_timeout_s}")

    @property
    def enabled(self) -> bool:
        return self.dp != "off" or self.secagg


def aggregates_by_mean(strategy: Strategy) -> bool:
    """Whether the strategy's server step starts from the mean of the updates (see :data:`MEAN_AGGREGATORS`)."""
    from flwr.serverapp.strategy import FedAvg

    inner = _inner(strategy)
    cls = type(inner)
    if cls.__module__.startswith("flwr.") and cls.__name__ in MEAN_AGGREGATORS:
        return True
    return isinstance(inner, FedAvg) and cls.aggregate_train is FedAvg.aggregate_train  # a third-party FedAvg


def _inner(strategy: Strategy) -> Strategy:
    while (nested := getattr(strategy, "strategy", None)) is not None:  # inside Flower's DP wrappers
        strategy = nested
    return strategy


def _flower_name(strategy: Strategy) -> str:
    return type(_inner(strategy)).__name__


def check_privacy(cfg: Any, strategy: Strategy) -> list[str]:
    """Refuse settings that cannot work together, before anything starts; returns warnings to show.

    Args:
        cfg: the run's ``FlConfig``.
        strategy: the aggregator's strategy as ``build_strategy`` made it.

    Raises:
        ConfigError: SecAgg+ with an aggregator that needs individual updates, too few clients for SecAgg+,
            a ``target_epsilon`` that cannot be checked, or one that a single round already exceeds.
    """
    p: PrivacyConfig = cfg.privacy
    notes: list[str] = []
    by_mean = aggregates_by_mean(strategy)
    if p.secagg and not by_mean:
        raise ConfigError(
            f"--secagg cannot run with aggregator {cfg.aggregator!r} (Flower's {_flower_name(strategy)}): it needs "
            f"each client's update, which SecAgg+ hides from the server; use one that averages: "
            f"fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad"
        )
    if p.secagg and cfg.clients < 2:
        raise ConfigError(f"--secagg needs at least 2 clients (it hides each one in their sum); got {cfg.clients}")
    if p.dp == "off":
        return notes
    try:
        wrap_strategy(strategy, p, num_sampled_clients=max(1, int(cfg.clients * cfg.fraction_train)))
    except ValueError as err:  # Flower's own checks of the wrapper's settings
        raise ConfigError(f"privacy settings refused by Flower's DP wrapper: {err}") from err
    reason = PrivacyLedger.unaccounted_reason(p, cfg.aggregator, strategy)
    if reason is not None:
        if p.target_epsilon is not None:
            raise ConfigError(f"--target-epsilon cannot be enforced: {reason}")
        notes.append(f"privacy: {reason}")
        return notes
    ledger = PrivacyLedger(p, population_size=cfg.clients)
    fit = ledger.rounds_within_budget(cfg.rounds)
    if fit == 0:
        one = ledger.epsilon_after(1)
        raise ConfigError(
            f"--target-epsilon {p.target_epsilon:g} is below the ε of a single round ({one:.3g} at δ={p.delta:g}, "
            f"noise multiplier {p.noise_multiplier:g}); raise --noise-multiplier or --target-epsilon"
        )
    if fit < cfg.rounds:
        notes.append(
            f"privacy: the budget ε={p.target_epsilon:g} allows {fit} of {cfg.rounds} rounds "
            f"(ε={ledger.epsilon_after(fit):.3g} at δ={p.delta:g}); the run stops after round {fit}"
        )
    return notes


def wrap_strategy(strategy: Strategy, p: PrivacyConfig, *, num_sampled_clients: int) -> Strategy:
    """Central DP: ``strategy`` inside the Flower wrapper ``p`` asks for (unchanged for local DP or off).

    Under central DP the mean is made unweighted (every client reports :data:`WEIGHT_KEY` = 1), the aggregation
    DP-FedAvg's noise calibration and accounting assume.
    """
    if p.dp != "central":  # local DP holds whatever the server does with the noisy updates
        return strategy
    if hasattr(strategy, "weighted_by_key"):
        setattr(strategy, "weighted_by_key", WEIGHT_KEY)  # noqa: B010 - FedAvg's attribute, not in Strategy
    from flwr.serverapp import strategy as fs

    server = p.clip_on == "server"
    if p.clipping == "fixed":
        fixed = (
            fs.DifferentialPrivacyServerSideFixedClipping if server else fs.DifferentialPrivacyClientSideFixedClipping
        )
        return fixed(strategy, p.noise_multiplier, p.clip, num_sampled_clients)
    adaptive = (
        fs.DifferentialPrivacyServerSideAdaptiveClipping if server else fs.DifferentialPrivacyClientSideAdaptiveClipping
    )
    return adaptive(
        strategy, p.noise_multiplier, num_sampled_clients, initial_clipping_norm=p.clip,
        target_clipped_quantile=p.target_clipped_quantile, clip_norm_lr=p.clip_norm_lr,
        clipped_count_stddev=p.clipped_count_stddev,
    )  # fmt: skip


def train_config(p: PrivacyConfig) -> dict[str, str | int | float]:
    """What the clients' mods need to know, added to each round's train config."""
    if p.dp == "off":
        return {}
    out: dict[str, str | int | float] = {f"{_CONFIG_PREFIX}dp": p.dp}
    if p.dp == "central":
        out[f"{_CONFIG_PREFIX}clip-on"] = p.clip_on
        out[f"{_CONFIG_PREFIX}clipping"] = p.clipping
    else:
        out[f"{_CONFIG_PREFIX}clip"] = p.clip
        out[f"{_CONFIG_PREFIX}noise-multiplier"] = p.noise_multiplier
        out[f"{_CONFIG_PREFIX}delta"] = p.delta
    return out


def _local_epsilon(noise_multiplier: float, delta: float) -> float:
    # LocalDpMod adds std = sensitivity * sqrt(2 ln(1.25 / δ)) / ε; this ε makes that std = noise_multiplier * clip.
    return math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier


def client_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The ClientApp mod: runs the Flower DP mod the round's config asks for, and reports weight 1 under central DP."""
    from flwr.app import ConfigRecord, MessageType

    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    config = next((r for r in msg.content.config_records.values() if isinstance(r, ConfigRecord)), None)
    mode = str(config.get(f"{_CONFIG_PREFIX}dp", "off")) if config is not None else "off"
    if mode == "off":
        return call_next(msg, ctxt)
    assert config is not None

    def unit_weight(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if not reply.has_error():
            for record in reply.content.metric_records.values():
                record[WEIGHT_KEY] = 1
        return reply

    from flwr.clientapp import mod

    if mode == "local":
        clip = float(config[f"{_CONFIG_PREFIX}clip"])  # type: ignore[arg-type]
        delta = float(config[f"{_CONFIG_PREFIX}delta"])  # type: ignore[arg-type]
        epsilon = _local_epsilon(float(config[f"{_CONFIG_PREFIX}noise-multiplier"]), delta)  # type: ignore[arg-type]
        return mod.LocalDpMod(clipping_norm=clip, sensitivity=clip, epsilon=epsilon, delta=delta)(msg, ctxt, call_next)
    if str(config.get(f"{_CONFIG_PREFIX}clip-on")) == "client":
        clipping = (
            mod.adaptiveclipping_mod
            if str(config.get(f"{_CONFIG_PREFIX}clipping")) == "adaptive"
            else mod.fixedclipping_mod
        )
        return clipping(msg, ctxt, unit_weight)
    return unit_weight(msg, ctxt)


class PrivacyLedger:
    """The (ε, δ) a run has spent, composed with Flower's RDP accountant, one Gaussian release per round.

    Central DP: a round releases the noisy unweighted mean of ``m`` clipped updates with noise
    ``noise_multiplier * clip / n`` (``n`` sampled), i.e. a Gaussian mechanism of multiplier
    ``noise_multiplier * m / n``. Adaptive clipping splits the same multiplier between the update and the
    clipped-count query (Andrew et al. 2021), so a round costs the same. Local DP: each client's update is a
    Gaussian mechanism of multiplier ``noise_multiplier``; the ε is that of a client that took part in every
    round. No amplification by sampling is claimed (Flower samples a fixed number of clients, not Poisson), so
    with ``fraction_train`` < 1 the ε is an upper bound.
    """

    def __init__(self, p: PrivacyConfig, *, population_size: int) -> None:
        from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
        from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.settings = p
        self._population = population_size
        self._config = FlowerPrivacyConfig(
            target_delta=p.delta, population_size=population_size,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=p.target_epsilon,
        )  # fmt: skip
        try:
            self._accountant = RdpAccountant(self._config)
        except ImportError as err:
            raise ConfigError(
                "privacy accounting needs Google's dp-accounting: pip install 'fedge[dp]' (or 'flwr[dp]')"
            ) from err

    @staticmethod
    def unaccounted_reason(p: PrivacyConfig, aggregator: str, strategy: Strategy) -> str | None:
        """Why ε cannot be reported for this run (the accountant's assumptions do not hold), or None."""
        if p.dp == "central" and not aggregates_by_mean(strategy):
            return (
                f"ε is not reported: the RDP accountant assumes the server releases the noisy mean of clipped "
                f"updates, and aggregator {aggregator!r} (Flower's {_flower_name(strategy)}) does not aggregate by a "
                f"mean, so its sensitivity is not the clip norm"
            )
        if p.dp == "central" and not hasattr(_inner(strategy), "weighted_by_key"):
            return f"ε is not reported: aggregator {aggregator!r} cannot be made to weight clients uniformly"
        return None

    def _event(self, multiplier: float) -> Any:
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        return GaussianPrivacyEvent(noise_multiplier=multiplier, sample_size=1, population_size=self._population)

    def epsilon_after(self, rounds: int) -> float:
        """ε at δ after ``rounds`` full rounds from the start (no state is changed)."""
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        fresh = RdpAccountant(self._config)
        fresh.compose(self._event(self.settings.noise_multiplier), rounds)
        return fresh.get_epsilon(self.settings.delta)

    def rounds_within_budget(self, rounds: int) -> int:
        """How many of ``rounds`` full rounds fit in ``target_epsilon`` (all when there is none)."""
        if self.settings.target_epsilon is None:
            return rounds
        fit = 0
        while fit < rounds and self.epsilon_after(fit + 1) <= self.settings.target_epsilon:
            fit += 1
        return fit

    def would_exceed(self) -> bool:
        """Whether one more full round would spend more than ``target_epsilon``."""
        if self.settings.target_epsilon is None:
            return False
        return bool(self._accountant.would_exceed(self._event(self.settings.noise_multiplier)))

    def compose(self, *, num_replies: int, num_sampled: int) -> None:
        """Add one released round: ``num_replies`` of the ``num_sampled`` clients' updates went into it."""
        if num_replies < 1:
            return
        z = self.settings.noise_multiplier
        if self.settings.dp == "central" and num_replies < num_sampled:
            z = z * num_replies / num_sampled  # noise was calibrated for n, the mean is over fewer
        self._accountant.compose(self._event(z))

    def spent(self) -> dict[str, float | int]:
        """``epsilon``, ``delta`` and the number of releases so far (for a metrics line)."""
        if self._accountant.num_releases == 0:
            return {"epsilon": 0.0, "delta": self.settings.delta}
        got = self._accountant.get_privacy_spent()
        return {"epsilon": round(got.epsilon, 6), "delta": got.delta}

    def save(self, path: Path) -> None:
        from fedge.rundir import atomic_write_text

        atomic_write_text(path, json.dumps(self._accountant.state_dict(), indent=1))

    def load(self, path: Path) -> None:
        """Restore a saved ledger (a resumed run keeps what it spent)."""
        try:
            self._accountant.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot resume the privacy ledger {path}: {err}; the run's privacy settings must not change"
            ) from err


def describe_spent(spent: dict[str, Any]) -> str:
    """The summary line of a run's privacy: the ε spent at δ, or why none is reported, and a budget stop."""
    if spent.get("epsilon") is None:
        line = f"privacy: ε not reported (the accountant's assumptions do not hold; see the run's log), δ={spent['delta']:g}"
    else:
        line = f"privacy: spent ε={spent['epsilon']:.4g} at δ={spent['delta']:g}"
    if stopped := spent.get("stopped"):
        line += f"; {stopped}"
    return line
