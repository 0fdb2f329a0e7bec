"""The per-rank side of ``fedge bench``: ``python -m fedge.plugins.train.bench_worker RUN_DIR`` under torchrun.

Reads ``RUN_DIR/bench.json`` ({"what": "collectives"|"strategies", ...}) and rank 0 writes
``RUN_DIR/results.json``. Every comparison is measured in one run and interleaved: each repetition
times every implementation once, in rotating order, so load from other processes hits all of them
alike; the figure reported is the median over repetitions of the slowest rank's time.

- collectives: sum a float32 buffer over all ranks with the backend's all_reduce (``native``), fedge's
  ring and tree, and one parameter-server push/pull round (last rank serves). busbw = algbw x 2(W-1)/W,
  the all-reduce convention, for every implementation.
- strategies: the time of one training step of each strategy on the same model and global batch,
  against ``torch.nn.parallel.DistributedDataParallel`` (``ddp``). A parameter server (sync mode) counts
  its server ranks among the processes, as ``fedge train`` does.
- compute (``fedge advise``): forward + backward + SGD of a model on each computing rank's rows, every rank
  at once as in a training step but with no communication; the figure is the median over steps of the
  slowest rank's time in that step.

With ``"after_compute": true`` the collectives bench also times each collective right after a spell of
compute on every rank (as a training step reaches it), and reports ``wake_us``: how much longer that call
takes than a back-to-back one, at the smallest size; with ``"fsdp_shapes"`` it adds rows of what
``fully_shard`` adds to a step (``kind`` ``fsdp``), and with ``"compute"`` (a compute spec) the compute rows
(``kind`` ``compute``), so a first ``fedge advise`` starts its processes once.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from fedge.rundir import RunDir

if TYPE_CHECKING:
    from fedge.plugins.train.base import Strategy

__all__ = ["main"]


def _timed(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call of ``fn`` on the slowest rank."""
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _interleaved(
    impls: dict[str, Callable[[], object]],
    *,
    reps: int,
    iters: int,
    warmup: int = 1,
    after_rep: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each impl over ``reps`` interleaved repetitions; ``after_rep`` gets the
    medians so far after each one."""
    names = list(impls)
    for name in names:
        for _ in range(warmup):
            impls[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            times[name].append(_timed(impls[name], iters))
        if after_rep is not None:
            after_rep({n: statistics.median(t) for n, t in times.items()})
    return {n: statistics.median(t) for n, t in times.items()}


class _Partial:
    """Rank 0 keeps what was measured so far in ``partial.json``, for a bench stopped by Ctrl-C to print."""

    def __init__(self, run: RunDir) -> None:
        self.run, self.done = run, []
        self.enabled = dist.get_rank() == 0

    def write(self, rows: list[dict[str, Any]], *, reps_done: int) -> None:
        if self.enabled:
            self.run.write_json("partial.json", {"reps_done": reps_done, "rows": [*self.done, *rows]})


def _collective_impls(buf: torch.Tensor, spec: dict[str, Any], w: int) -> dict[str, Callable[[], object]]:
    """One call each of native, ring, tree and parameter-server on ``buf``; scratch buffers reused."""
    from fedge.plugins.strategies.parameter_server import ps_exchange
    from fedge.plugins.strategies.ring_allreduce import ring_all_reduce
    from fedge.plugins.strategies.tree_allreduce import tree_all_reduce

    scratch: dict[str, Any] = {"ring": None, "tree": None, "ps": None}

    def ring() -> None:
        scratch["ring"] = ring_all_reduce(buf, chunk_bytes=spec["ring_chunk_bytes"], scratch=scratch["ring"])

    def tree() -> None:
        scratch["tree"] = tree_all_reduce(buf, chunk_bytes=spec["tree_chunk_bytes"], scratch=scratch["tree"])

    def ps() -> None:
        scratch["ps"] = ps_exchange(buf, buffers=scratch["ps"])

    impls: dict[str, Callable[[], object]] = {"native": lambda: dist.all_reduce(buf), "ring": ring, "tree": tree}
    if w > 1:
        impls["parameter-server"] = ps
    return impls


def _collective_rows(times: dict[str, float], size: int, w: int) -> list[dict[str, Any]]:
    rows = []
    for name, t in times.items():
        algbw = size / t / 1e9
        rows.append(
            {
                "impl": name,
                "bytes": size,
                "algbw_gbps": algbw,
                "busbw_gbps": algbw * 2 * (w - 1) / w if w > 1 else algbw,
                "ratio_to_native": times["native"] / t,
                "time_us": t * 1e6,
            }
        )
    return rows


def _collectives(spec: dict[str, Any], partial: _Partial) -> list[dict[str, Any]]:
    w = dist.get_world_size()
    rows: list[dict[str, Any]] = []
    for size in spec["sizes"]:
        buf = torch.zeros(size // 4, dtype=torch.float32)  # sums of zeros stay finite however often they run
        impls = _collective_impls(buf, spec, w)
        iters = max(2, min(spec["max_iters"], (8 << 20) // size))
        times = _interleaved(impls, reps=spec["reps"], iters=iters)
        rows += _collective_rows(times, size, w)
        partial.write(rows, reps_done=spec["reps"])
    if spec.get("after_compute"):
        wake = _wake_up(min(spec["sizes"]), spec, w)
        for row in rows:
            row["wake_us"] = wake[row["impl"]] * 1e6
    return rows + [_fsdp_unit_row(layers, width, spec, w) for layers, width in spec.get("fsdp_shapes", [])]


def _fsdp_unit_row(num_layers: int, width: int, spec: dict[str, Any], w: int) -> dict[str, Any]:
    """What ``fully_shard`` adds to a step of ``num_layers`` Linear(width, width) units (each its own FSDP unit,
    then the root): an FSDP step minus the same model's unsharded step, interleaved in one run. That is every
    unit's all-gathers and reduce-scatter with their copies in and out, and FSDP's hooks around them."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (w,))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(nn.Sequential(*[nn.Linear(width, width) for _ in range(num_layers)]))
    plain, sharded = models
    for layer in sharded:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(32, width)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]

    def step(i: int) -> None:
        opts[i].zero_grad(set_to_none=True)
        models[i](x).square().mean().backward()
        opts[i].step()

    times = _interleaved({"plain": lambda: step(0), "fsdp": lambda: step(1)}, reps=spec["reps"], iters=5)
    size = sum(p.numel() * 4 for p in plain.parameters())
    return {"kind": "fsdp", "units": num_layers + 1, "bytes": size, "extra_s": times["fsdp"] - times["plain"]}


def _spell() -> Callable[[], object]:
    """About a millisecond of single-thread compute that also sweeps a few MB through the caches, as a layer's
    forward and backward do between two collectives."""
    a, b = torch.randn(192, 192), torch.randn(192, 192)
    sweep = torch.zeros(1 << 20)

    def spell() -> None:
        for _ in range(4):
            torch.mm(a, b)
        sweep.add_(1.0)

    return spell


def _call_times(call: Callable[[], object], before: Callable[[], object] | None, iters: int) -> list[float]:
    """Per iteration, the seconds from the moment the last rank started ``call`` until every rank had finished
    it (``before`` runs first on every rank, untimed). The wait for the slowest rank's ``before`` is left out:
    what remains is the collective as a training step meets it after its slowest rank's compute - including
    waking the ranks that got there first (a parameter server's worker sleeps in its pull after the server,
    the last to arrive, has sent)."""
    w = dist.get_world_size()
    dist.barrier()
    starts, ends = [], []
    for _ in range(iters):
        if before is not None:
            before()
        starts.append(time.perf_counter())
        call()
        ends.append(time.perf_counter())
    mine = torch.tensor([starts, ends], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(w)]
    dist.all_gather(every, mine)
    # perf_counter is one clock for every process of this machine (CLOCK_MONOTONIC).
    stacked = torch.stack(every)  # (rank, start/end, iteration)
    return (stacked[:, 1, :].max(0).values - stacked[:, 0, :].max(0).values).tolist()


def _wake_up(size: int, spec: dict[str, Any], w: int) -> dict[str, float]:
    """Seconds each collective on ``size`` bytes takes beyond its back-to-back time when every rank reaches it
    after a spell of compute: the peers that got there first sleep in their receive and must be woken, and the
    caches hold the compute's data, not the buffers. The parameter server's server rank does not compute (in a
    step it waits for the push), so only its workers run the spell. Timed from the last rank's arrival (the
    wait for the slowest rank's compute belongs to the compute term) to the last rank's finish; the mean over
    a repetition's calls (a woken peer now and then waits a whole scheduler tick, and a step pays the mean),
    median over repetitions, both ways interleaved."""
    buf = torch.zeros(size // 4, dtype=torch.float32)
    calls = _collective_impls(buf, spec, w)
    spell = _spell()
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {f"{n}{how}": [] for n in calls for how in ("", "+spell")}
    names = list(calls)
    serves = dist.get_rank() == w - 1  # a parameter server's server rank waits for the push, it does not compute
    iters = spec["wake_iters"]
    for rep in range(spec["reps"]):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            before = None if name == "parameter-server" and serves else spell
            times[name].append(statistics.mean(_call_times(calls[name], None, iters)))
            times[name + "+spell"].append(statistics.mean(_call_times(calls[name], before, iters)))
    return {n: max(0.0, statistics.median(times[n + "+spell"]) - statistics.median(times[n])) for n in calls}


def _compute(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from fedge.plugins.models import build_model

    w, r = dist.get_world_size(), dist.get_rank()
    shape, classes = (1, 8, 8), 10
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in spec.get("cases", []):  # {"name", "rows" per computing rank, "ranks" that compute (the first ones)}
        net = build_model(spec["model"], spec["model_options"], input_shape=shape, num_classes=classes)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(case["rows"], *shape, generator=gen)
        y = torch.randint(0, classes, (case["rows"],), generator=gen)
        computes = r < case["ranks"]
        per_step = []
        dist.barrier()
        for i in range(spec["warmup"] + spec["iters"]):
            t0 = time.perf_counter()
            if computes:
                opt.zero_grad(set_to_none=False)
                F.cross_entropy(net(x), y).backward()
                opt.step()
            if i >= spec["warmup"]:
                per_step.append(time.perf_counter() - t0)
        every = [torch.zeros(len(per_step), dtype=torch.float64) for _ in range(w)]
        dist.all_gather(every, torch.tensor(per_step, dtype=torch.float64))
        slowest = torch.stack(every).max(0).values  # a step waits for its slowest rank
        rows.append({"case": case["name"], "compute_s": float(slowest.median()), "rows": case["rows"]})
    return rows


def _stepper(strategy: Strategy, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """Each call runs the next ``train_step``, numbered as the trainer numbers them (lr schedules read it)."""
    steps = itertools.count()
    return lambda: strategy.train_step(x, y, step=next(steps))


def _strategies(spec: dict[str, Any], partial: _Partial) -> list[dict[str, Any]]:
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from fedge.plugins.models import build_model
    from fedge.plugins.train.base import DistContext, resolve_strategy, strategy_config

    w, r = dist.get_world_size(), dist.get_rank()
    ctx = DistContext(rank=r, world_size=w, local_rank=r, backend="gloo", device=torch.device("cpu"))
    shape, classes, batch = (1, 8, 8), 10, spec["batch_size"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)

    def model() -> nn.Module:
        return build_model(spec["model"], spec["model_options"], input_shape=shape, num_classes=classes)

    ddp = DistributedDataParallel(model(), bucket_cap_mb=spec["bucket_mb"])
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    n = batch // w

    def ddp_step() -> None:
        ddp_opt.zero_grad(set_to_none=False)
        F.cross_entropy(ddp(x[r * n : (r + 1) * n]), y[r * n : (r + 1) * n]).backward()
        ddp_opt.step()

    impls: dict[str, Callable[[], object]] = {"ddp": ddp_step}
    params = sum(p.numel() for p in ddp.parameters())
    sent: dict[str, Callable[[], float | None]] = {"ddp": lambda: float(params * 4)}
    for name, options in spec["strategies"].items():
        cls = resolve_strategy(options.get("plugin", name))
        scfg = strategy_config(cls, {k: v for k, v in options.items() if k != "plugin"} | {"lr": 0.01}, name)
        strategy = cls(scfg, ctx)
        strategy.setup(model())
        impls[name] = _stepper(strategy, x, y)
        sent[name] = lambda s=strategy: s.step_metrics().get("grad_bytes")

    def rows(times: dict[str, float]) -> list[dict[str, Any]]:
        return [
            {"impl": name, "step_ms": t * 1e3, "samples_per_s": batch / t, "throughput_vs_ddp": times["ddp"] / t,
             "params": params, "grad_bytes": sent[name]()}
            for name, t in times.items()
        ]  # fmt: skip

    reps_done = itertools.count(1)
    times = _interleaved(
        impls, reps=spec["reps"], iters=spec["iters"], warmup=2,
        after_rep=lambda t: partial.write(rows(t), reps_done=next(reps_done)),
    )  # fmt: skip
    return rows(times)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run = RunDir(Path(argv[0]))
    spec = json.loads(run.file("bench.json").read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec.get("timeout_s", 300)))
    try:
        partial = _Partial(run)
        if spec["what"] == "compute":
            rows = _compute(spec)
        elif spec["what"] == "collectives":  # with "compute", the same processes time a model's compute too
            rows = _collectives(spec, partial) + [{"kind": "compute", **r} for r in _compute(spec.get("compute", {}))]
        else:
            rows = _strategies(spec, partial)
        if int(os.environ["RANK"]) == 0:
            run.write_json("results.json", rows)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
