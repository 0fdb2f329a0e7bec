"""fedge's ``allreduce`` strategy (bucketed gradients, all_reduce launched from backward hooks) against
PyTorch's DistributedDataParallel: step throughput as a ratio, measured in one run.

Target on a 2-core machine, 2 processes: allreduce >= 0.95x DDP's throughput. The ring and tree
strategies, and the parameter server in sync mode (one of the processes serves) when the batch splits over
its workers, are timed in the same run for comparison. Every repetition times each implementation once,
in rotating order; the ratio is of medians (``fedge bench strategies``).

Run::

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/ddp_vs_native.py [--nproc 2] [--reps 9] [--json]
"""

from __future__ import annotations

import argparse
import json

from fedge.plugins.train.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--hidden", default="1024,1024")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    strategies: dict[str, dict[str, object]] = {"allreduce": {"bucket_mb": 25.0}, "ring-allreduce": {}, "tree-allreduce": {}}
    if args.nproc > 1 and args.batch_size % (args.nproc - 1) == 0:  # the last process serves
        strategies["parameter-server"] = {"mode": "sync", "num_servers": 1}
    spec = {
        "model": "mlp", "model_options": {"hidden": [int(h) for h in args.hidden.split(",")]},
        "batch_size": args.batch_size, "bucket_mb": 25.0, "reps": args.reps, "iters": args.iters,
        "strategies": strategies,
    }
    rows = run_bench("strategies", args.nproc, spec)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"model mlp hidden={args.hidden} ({rows[0]['params']} params), global batch {args.batch_size}, {args.nproc} processes")
    for r in rows:
        print(f"{r['impl']:<17} {r['step_ms']:8.2f} ms/step  {r['throughput_vs_ddp']:6.3f}x ddp")
    native = next(r for r in rows if r["impl"] == "allreduce")["throughput_vs_ddp"]
    print(f"allreduce throughput / DDP = {native:.3f} (target >= 0.95: {'ok' if native >= 0.95 else 'BELOW'})")


if __name__ == "__main__":
    main()
