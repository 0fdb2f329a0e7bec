"""The cost model behind ``fedge advise``: an alpha-beta (latency-bandwidth) fit of each collective, measured by
``fedge bench collectives`` on this machine, plus a measured compute time, predicts each strategy's step time.

A collective on ``n`` bytes takes ``alpha + beta * n`` seconds (Hockney's model): ``alpha`` is the per-call
latency, ``1 / beta`` the bandwidth. The fit minimises the *relative* squared error, so the 4 KB points
(latency) weigh as much as the 16 MB ones (bandwidth); a negative intercept is clamped to 0 and the slope
refit; points more than twice the fit (another process held the core) are dropped and the rest refit.

Step time of a strategy = compute + communication, each term measured on this machine:

- compute: forward + backward + SGD of the model on one rank's rows, timed inside a W-process job with every
  rank computing at once (``fedge bench`` worker, ``compute``), as the median over steps of the slowest rank's
  time. One process alone is up to twice as fast: in the job the ranks share the cores, the memory bandwidth
  and whatever else runs on the machine, and a step waits for the slowest of them. The parameter server's
  compute is the same with W - 1 workers on B/(W-1) rows while the server rank idles.
- a collective's alpha-beta fit (``bench collectives``, back to back);
- its wake-up: how much longer one call takes when every rank reaches it after a spell of compute, as a
  training step does, than back to back (the peer sleeps in its receive and must be woken, the caches hold
  the compute's data); measured by the calibration at the smallest size from the last rank's arrival to
  the last rank's finish (the wait for the slowest rank's compute is already in the compute term), the mean
  over calls (now and then a woken peer waits a whole scheduler tick), paid once per call;
- for ``fsdp``, what ``fully_shard`` adds per unit and per byte: an FSDP step of a stack of Linear layers minus
  the same stack's unsharded step, at three shapes, fitted as ``units x unit_s + beta x bytes``
  (:func:`fit_per_unit`); that holds every unit's all-gathers and reduce-scatter, their copies in and out and
  FSDP's hooks, which on gloo cost far more than the bytes they move.

Per strategy:

- ``allreduce``, ``ring-allreduce``, ``tree-allreduce``: one all-reduce of the gradients by that implementation
  (``native``, ``ring``, ``tree``) and one wake-up; ``allreduce`` sends one call per bucket (1 MiB first, then
  25 MiB), each paying the fit's alpha;
- ``parameter-server`` (sync, one server): one push/pull round (``parameter-server``) and one wake-up, compute
  on W - 1 workers;
- ``fsdp``: the per-unit fit over the model's units (top-level children with parameters, plus the root) and its
  gradient bytes, plus the one all-reduce of the loss.

Communication is taken as not overlapped with compute (on a few CPU cores they compete for the same cores).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedge.errors import ConfigError

__all__ = ["AlphaBeta", "Prediction", "UnitCost", "fit_alpha_beta", "fit_collectives", "fit_per_unit", "predict", "rank"]


@dataclass(frozen=True, slots=True)
class AlphaBeta:
    """One collective's cost: ``alpha_s + beta_s_per_byte * bytes`` seconds."""

    alpha_s: float
    beta_s_per_byte: float
    max_rel_error: float = 0.0
    """The largest relative error of the fit on the points it was fitted to."""

    def time_s(self, num_bytes: float) -> float:
        return self.alpha_s + self.beta_s_per_byte * num_bytes


def fit_alpha_beta(points: Iterable[tuple[float, float]], *, outlier_factor: float = 2.0) -> AlphaBeta:
    """Least-squares ``t = alpha + beta * n`` over ``(bytes, seconds)`` points, in relative error.

    Delays from other processes only ever add time, so a point measured more than ``outlier_factor`` times
    the fit is dropped and the rest refit (twice at most, keeping at least three points and two sizes).

    Raises:
        ConfigError: fewer than two distinct sizes, or a time that is not positive.
    """
    pts = [(float(n), float(t)) for n, t in points]
    if len({n for n, _ in pts}) < 2:
        raise ConfigError("an alpha-beta fit needs timings at two or more buffer sizes; measure more --sizes")
    if any(not (t > 0 and math.isfinite(t)) for _, t in pts):
        raise ConfigError("an alpha-beta fit needs positive, finite times; the collectives measurement is broken")
    fit = _fit(pts)
    for _ in range(2):
        kept = [(n, t) for n, t in pts if t <= outlier_factor * fit.time_s(n)]
        if len(kept) == len(pts) or len(kept) < 3 or len({n for n, _ in kept}) < 2:
            break
        pts, fit = kept, _fit(kept)
    return fit


def _fit(pts: list[tuple[float, float]]) -> AlphaBeta:
    # Weighted normal equations with weights 1/t^2: minimise sum(((alpha + beta n) - t) / t)^2.
    w = [1.0 / (t * t) for _, t in pts]
    s0 = sum(w)
    s1 = sum(wi * n for wi, (n, _) in zip(w, pts, strict=True))
    s2 = sum(wi * n * n for wi, (n, _) in zip(w, pts, strict=True))
    b0 = sum(wi * t for wi, (_, t) in zip(w, pts, strict=True))
    b1 = sum(wi * n * t for wi, (n, t) in zip(w, pts, strict=True))
    det = s0 * s2 - s1 * s1
    alpha, beta = (b0 * s2 - b1 * s1) / det, (s0 * b1 - s1 * b0) / det
    if alpha < 0:
        alpha, beta = 0.0, b1 / s2
    beta = max(beta, 0.0)
    worst = max(abs(alpha + beta * n - t) / t for n, t in pts)
    return AlphaBeta(alpha, beta, worst)


def fit_collectives(rows: Iterable[Mapping[str, float | str]]) -> dict[str, AlphaBeta]:
    """``{impl: AlphaBeta}`` from ``fedge bench collectives`` rows (``impl``, ``bytes``, ``algbw_gbps``)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        size = float(row["bytes"])
        points.setdefault(str(row["impl"]), []).append((size, size / (float(row["algbw_gbps"]) * 1e9)))
    return {impl: fit_alpha_beta(pts) for impl, pts in points.items()}


@dataclass(frozen=True, slots=True)
class UnitCost:
    """What FSDP adds to a step: ``unit_s`` per unit plus ``beta_s_per_byte`` per byte of parameters."""

    unit_s: float
    beta_s_per_byte: float

    def time_s(self, num_units: int, num_bytes: float) -> float:
        return self.unit_s * num_units + self.beta_s_per_byte * num_bytes


def fit_per_unit(points: Iterable[tuple[int, float, float]]) -> UnitCost:
    """Least-squares ``t = unit_s * units + beta * bytes`` over ``(units, bytes, seconds)``, in relative error;
    a negative coefficient is clamped to 0 and the other refit.

    Raises:
        ConfigError: fewer than two points, or a time that is not positive.
    """
    pts = [(float(u), float(n), float(t)) for u, n, t in points]
    if len(pts) < 2 or any(not (t > 0 and math.isfinite(t)) for _, _, t in pts):
        raise ConfigError("the fsdp unit fit needs two or more positive timings; measure the calibration again (--refit)")
    w = [1.0 / (t * t) for _, _, t in pts]
    suu = sum(wi * u * u for wi, (u, _, _) in zip(w, pts, strict=True))
    snn = sum(wi * n * n for wi, (_, n, _) in zip(w, pts, strict=True))
    sun = sum(wi * u * n for wi, (u, n, _) in zip(w, pts, strict=True))
    sut = sum(wi * u * t for wi, (u, _, t) in zip(w, pts, strict=True))
    snt = sum(wi * n * t for wi, (_, n, t) in zip(w, pts, strict=True))
    det = suu * snn - sun * sun
    unit, beta = ((sut * snn - snt * sun) / det, (suu * snt - sun * sut) / det) if det > 0 else (-1.0, -1.0)
    if beta < 0 or det <= 0:
        unit, beta = sut / suu, 0.0
    if unit < 0:
        unit, beta = 0.0, snt / snn
    return UnitCost(unit, beta)


@dataclass(frozen=True, slots=True)
class Prediction:
    """One strategy's predicted step, in seconds, and why."""

    strategy: str
    step_s: float
    compute_s: float
    comm_s: float
    reason: str


def _bound(fit: AlphaBeta, num_bytes: float, *, calls: int = 1) -> str:
    latency, transfer = fit.alpha_s * calls, fit.beta_s_per_byte * num_bytes
    kind = "latency" if latency >= transfer else "bandwidth"
    alpha = f"{calls} x alpha" if calls > 1 else "alpha"
    return (
        f"{kind} bound ({alpha} {latency * 1e6:.0f} us vs beta x n {transfer * 1e6:.0f} us; "
        f"the fit is within {fit.max_rel_error:.0%} of its points)"
    )


_ALLREDUCE_IMPL = {"allreduce": "native", "ring-allreduce": "ring", "tree-allreduce": "tree"}
_FIRST_BUCKET_BYTES, _BUCKET_BYTES = 1 << 20, 25 << 20  # the allreduce strategy's defaults


def _buckets(grad_bytes: float) -> list[float]:
    """The bytes of each bucket the allreduce strategy sends, at its default bucket sizes."""
    if grad_bytes <= _FIRST_BUCKET_BYTES:
        return [grad_bytes]
    rest = grad_bytes - _FIRST_BUCKET_BYTES
    full, tail = divmod(rest, _BUCKET_BYTES)
    return [float(_FIRST_BUCKET_BYTES)] + [float(_BUCKET_BYTES)] * int(full) + ([tail] if tail else [])


def predict(
    fits: Mapping[str, AlphaBeta],
    *,
    grad_bytes: float,
    num_units: int,
    compute_s: Mapping[str, float],
    world_size: int,
    wake_s: Mapping[str, float] | None = None,
    fsdp: UnitCost | None = None,
) -> list[Prediction]:
    """The step time of every built-in data-parallel strategy the fits cover.

    Args:
        fits: :func:`fit_collectives` of a bench at ``world_size``.
        grad_bytes: the model's gradient bytes (float32 parameters x 4).
        num_units: FSDP units (top-level children with parameters, plus the root).
        compute_s: measured compute seconds per step keyed ``"dp"`` (B/W rows) and ``"ps"`` (B/(W-1) rows).
        wake_s: per collective, what one call after compute costs beyond the back-to-back fit (0 if absent).
        fsdp: :func:`fit_per_unit` of the calibration; without it fsdp is not predicted.
    """
    wake = dict(wake_s or {})
    mb = grad_bytes / 1e6
    out = []
    for name, impl in _ALLREDUCE_IMPL.items():
        if impl in fits:
            sizes = _buckets(grad_bytes) if name == "allreduce" else [grad_bytes]
            comm = sum(fits[impl].time_s(n) for n in sizes) + wake.get(impl, 0.0)
            why = f"{mb:.2f} MB of gradients through {impl} all-reduce is {_bound(fits[impl], grad_bytes, calls=len(sizes))}"
            out.append(Prediction(name, compute_s["dp"] + comm, compute_s["dp"], comm, why))
    if "parameter-server" in fits and "ps" in compute_s:
        fit = fits["parameter-server"]
        comm = fit.time_s(grad_bytes) + wake.get("parameter-server", 0.0)
        workers = f"{world_size - 1} workers share" if world_size > 2 else "1 worker takes"
        why = f"{workers} the batch and one server; push/pull is {_bound(fit, grad_bytes)}"
        out.append(Prediction("parameter-server", compute_s["ps"] + comm, compute_s["ps"], comm, why))
    if "native" in fits and fsdp is not None:
        units = fsdp.unit_s * num_units
        comm = fsdp.time_s(num_units, grad_bytes) + fits["native"].time_s(4.0)
        why = f"{num_units} units x {fsdp.unit_s * 1e3:.2f} ms of gathers, reduce-scatters and hooks = {units * 1e3:.2f} ms"
        out.append(Prediction("fsdp", compute_s["dp"] + comm, compute_s["dp"], comm, why))
    return out


def rank(predictions: Iterable[Prediction]) -> list[Prediction]:
    """Fastest first."""
    return sorted(predictions, key=lambda p: p.step_s)
