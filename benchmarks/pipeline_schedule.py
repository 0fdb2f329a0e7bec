"""Pipeline schedule efficiency: fedge's ``pipeline`` strategy against the formula and torch's own schedules.

Every stage's compute is a fixed sleep (forward ``--fwd-ms``, backward ``--bwd-ms`` per micro-batch), so
the machine's load does not matter and the ideal step time is known: (m + p - 1) x (fwd + bwd). Each
trial runs, back to back on the same split, fedge's strategy (``train_step``: schedule + optimizer + loss
all-reduce) and torch.distributed.pipelining's PipelineStage + ScheduleGPipe / Schedule1F1B alone.
Reported per schedule (medians over trials): fedge / formula, fedge / torch, and the measured bubble
next to (p - 1) / (m + p - 1).

Run (gloo on CPU, one process per stage)::

    .venv/bin/python benchmarks/pipeline_schedule.py --stages 2 --microbatches 8 --trials 5 [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage

from fedge.plugins.strategies._pipeline_stage import SCHEDULES
from fedge.plugins.strategies.pipeline import Pipeline
from fedge.plugins.train.base import DistContext

WIDTH = 10  # features = classes, so the last stage's output feeds cross-entropy directly


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, fwd_s, bwd_s):  # type: ignore[no-untyped-def]
        ctx.bwd_s = bwd_s
        ctx.save_for_backward(x, w)
        time.sleep(fwd_s)
        return x * w

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, w = ctx.saved_tensors
        time.sleep(ctx.bwd_s)
        return grad * w, (grad * x).sum().reshape(1), None, None


class SleepLayer(nn.Module):
    """A layer whose forward and backward take a fixed time per micro-batch."""

    def __init__(self, fwd_s: float, bwd_s: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.fwd_s, self.bwd_s = fwd_s, bwd_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.w, self.fwd_s, self.bwd_s)


def _worker(rank: int, args: argparse.Namespace, store_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    p, m = args.stages, args.microbatches
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, p), rank=rank, world_size=p, timeout=datetime.timedelta(seconds=120)
    )
    fwd_s, bwd_s = args.fwd_ms / 1e3, args.bwd_ms / 1e3
    batch = m * args.rows
    x, y = torch.randn(batch, WIDTH), torch.randint(0, WIDTH, (batch,))
    ctx = DistContext(rank=rank, world_size=p, local_rank=rank, backend="gloo", device=torch.device("cpu"))

    runs = {}
    for schedule in ("gpipe", "1f1b"):
        strategy = Pipeline(Pipeline.Config(stages=p, microbatches=m, schedule=schedule), ctx)
        strategy.setup(nn.Sequential(*[SleepLayer(fwd_s, bwd_s) for _ in range(p)]))
        stage = PipelineStage(nn.Sequential(SleepLayer(fwd_s, bwd_s)), rank, p, torch.device("cpu"))
        native = SCHEDULES[schedule](stage, m, loss_fn=F.cross_entropy)

        def fedge_step(strategy=strategy) -> None:
            strategy.train_step(x, y, step=0)

        def torch_step(native=native) -> None:
            if rank == 0:
                native.step(x)
            elif rank == p - 1:
                native.step(target=y, losses=[])
            else:
                native.step()

        runs[schedule] = {"fedge": fedge_step, "torch": torch_step, "strategy": strategy}

    times: dict[str, list[float]] = {f"{s}/{impl}": [] for s in runs for impl in ("fedge", "torch")}
    bubbles: dict[str, list[float]] = {s: [] for s in runs}
    for trial in range(args.trials + 1):  # trial 0 warms up (shape inference, first send/recv)
        for schedule, run in runs.items():
            for impl in ("fedge", "torch"):
                dist.barrier()
                t0 = time.perf_counter()
                run[impl]()
                elapsed = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if trial:
                    times[f"{schedule}/{impl}"].append(float(elapsed))
            if trial:
                bubbles[schedule].append(run["strategy"].last_metrics["bubble"])
    if rank == 0:
        formula_s = (m + p - 1) * (fwd_s + bwd_s)
        rows = []
        for schedule in runs:
            fedge_s = statistics.median(times[f"{schedule}/fedge"])
            torch_s = statistics.median(times[f"{schedule}/torch"])
            rows.append(
                {
                    "schedule": schedule,
                    "stages": p,
                    "microbatches": m,
                    "formula_s": formula_s,
                    "fedge_s": fedge_s,
                    "torch_s": torch_s,
                    "fedge_over_formula": fedge_s / formula_s,
                    "fedge_over_torch": fedge_s / torch_s,
                    "bubble_measured": statistics.median(bubbles[schedule]),
                    "bubble_formula": (p - 1) / (m + p - 1),
                }
            )
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    parser.add_argument("--fwd-ms", type=float, default=20.0)
    parser.add_argument("--bwd-ms", type=float, default=40.0)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(
            _worker, args=(args, os.path.join(tmp, "store"), out), nprocs=args.stages, start_method="spawn"
        )
        with open(out) as f:
            rows = json.load(f)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"p={args.stages} m={args.microbatches} fwd={args.fwd_ms}ms bwd={args.bwd_ms}ms, medians of {args.trials} steps"
    )
    print(
        f"{'schedule':8} {'formula s':>9} {'fedge s':>8} {'torch s':>8} {'fedge/formula':>13} {'fedge/torch':>11} {'bubble':>7} {'(p-1)/(m+p-1)':>13}"
    )
    for r in rows:
        print(
            f"{r['schedule']:8} {r['formula_s']:9.3f} {r['fedge_s']:8.3f} {r['torch_s']:8.3f} "
            f"{r['fedge_over_formula']:13.3f} {r['fedge_over_torch']:11.3f} {r['bubble_measured']:7.3f} {r['bubble_formula']:13.3f}"
        )


if __name__ == "__main__":
    main()
