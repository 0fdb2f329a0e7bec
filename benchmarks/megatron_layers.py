"""Megatron layers: fedge's tensor-parallel transformer blocks against torch's DTensor tensor-parallel API.

The same stack of tiny-gpt blocks (same seed, same shapes) is split two ways across ``--tp`` gloo
processes: fedge's ``parallelize_tp`` (autograd f/g operators on plain tensors) and
``torch.distributed.tensor.parallel.parallelize_module`` with ColwiseParallel q/k/v/fc and
RowwiseParallel proj. Each trial times one forward + backward of each, back to back; reported are the
medians and fedge's speed relative to torch's (torch time / fedge time; >= 1 means fedge is faster),
after checking that both give the same output.

Run::

    .venv/bin/python benchmarks/megatron_layers.py --tp 2 --trials 20 [--json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from fedge.plugins.models.tiny_gpt import Block
from fedge.plugins.strategies._megatron_layers import parallelize_tp


def _torch_tp(model: nn.Sequential, tp: int) -> nn.Sequential:
    mesh = init_device_mesh("cpu", (tp,))
    for block in model:
        plan = {
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(),
        }
        parallelize_module(block, mesh, plan)
        block.attn.num_heads //= tp  # Colwise outputs are local shards: this rank's heads
    return model


def _worker(rank: int, args: argparse.Namespace, store_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, args.tp),
        rank=rank,
        world_size=args.tp,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.manual_seed(0)
    base = nn.Sequential(*[Block(args.d_model, args.heads, 4 * args.d_model) for _ in range(args.layers)])
    ours = copy.deepcopy(base)
    parallelize_tp(ours, group=None, rank=rank, size=args.tp)
    theirs = _torch_tp(copy.deepcopy(base), args.tp)
    x = torch.randn(args.batch, args.seq_len, args.d_model, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)

    times: dict[str, list[float]] = {"fedge": [], "torch": []}
    for trial in range(args.trials + 2):  # two warm-up trials
        for name, model in (("fedge", ours), ("torch", theirs)):
            dist.barrier()
            t0 = time.perf_counter()
            model(x).sum().backward()
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            model.zero_grad(set_to_none=True)
            if trial >= 2:
                times[name].append(float(elapsed))
    if rank == 0:
        fedge_s, torch_s = statistics.median(times["fedge"]), statistics.median(times["torch"])
        per_trial = sorted(t / f for f, t in zip(times["fedge"], times["torch"]))
        row = {
            "tp": args.tp,
            "shape": [args.batch, args.seq_len, args.d_model],
            "layers": args.layers,
            "heads": args.heads,
            "fedge_ms": fedge_s * 1e3,
            "torch_ms": torch_s * 1e3,
            "fedge_speed_vs_torch": torch_s / fedge_s,
            "per_trial_ratio_median": statistics.median(per_trial),
        }
        with open(out_path, "w") as f:
            json.dump(row, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        mp.start_processes(_worker, args=(args, os.path.join(tmp, "store"), out), nprocs=args.tp, start_method="spawn")
        with open(out) as f:
            row = json.load(f)
    if args.json:
        print(json.dumps(row, indent=2))
        return
    print(
        f"tp={row['tp']} {row['layers']} blocks, input {tuple(row['shape'])}, {row['heads']} heads: "
        f"fedge {row['fedge_ms']:.2f} ms, torch TP {row['torch_ms']:.2f} ms per forward+backward "
        f"(medians of {args.trials}); fedge speed / torch speed = {row['fedge_speed_vs_torch']:.3f} "
        f"(per-trial median {row['per_trial_ratio_median']:.3f})"
    )


if __name__ == "__main__":
    main()
