"""fedge's ring, tree and parameter-server exchanges against gloo's native all_reduce, as ratios.

The issue's targets on a 2-core machine: ring busbw >= 0.9x native at 64 MB and >= 0.75x at 4 MB
(2 processes); tree >= 1.3x native at <= 256 KB (4 processes). Each world size is one torchrun job in
which every size and implementation is timed interleaved (``fedge bench collectives``), so the ratios
come from the same run; each is the median of ``--reps`` repetitions.

Run::

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/collectives.py [--reps 7] [--json]
"""

from __future__ import annotations

import argparse
import json

from fedge.plugins.train.bench import parse_size, run_bench

TARGETS = [  # (world, impl, size, target ratio to native)
    (2, "ring", "64MB", 0.9),
    (2, "ring", "4MB", 0.75),
    (4, "tree", "4KB", 1.3),
    (4, "tree", "64KB", 1.3),
    (4, "tree", "256KB", 1.3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ring-chunk", default="4MB")
    parser.add_argument("--tree-chunk", default="1MB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    for world in sorted({t[0] for t in TARGETS}):
        sizes = sorted({parse_size(s) for w, _, s, _ in TARGETS if w == world})
        spec = {
            "sizes": sizes, "reps": args.reps, "max_iters": 50,
            "ring_chunk_bytes": parse_size(args.ring_chunk), "tree_chunk_bytes": parse_size(args.tree_chunk),
        }
        rows = run_bench("collectives", world, spec)
        for w, impl, size, target in TARGETS:
            if w != world:
                continue
            row = next(r for r in rows if r["impl"] == impl and r["bytes"] == parse_size(size))
            results.append({"world": w, "impl": impl, "size": size, "ratio_to_native": row["ratio_to_native"],
                            "busbw_gbps": row["busbw_gbps"], "target": target, "met": row["ratio_to_native"] >= target})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'world':>5}  {'impl':<5} {'size':>6}  {'busbw GB/s':>10}  {'x native':>8}  target")
    for r in results:
        mark = "ok" if r["met"] else "BELOW"
        print(f"{r['world']:>5}  {r['impl']:<5} {r['size']:>6}  {r['busbw_gbps']:>10.3f}  {r['ratio_to_native']:>8.2f}  >= {r['target']} {mark}")


if __name__ == "__main__":
    main()
