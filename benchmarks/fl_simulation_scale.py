"""1000 virtual clients in Flower's Simulation Engine: wall time and peak memory of the whole process tree
(fedge, Ray's raylet and GCS, its client actors), sampled every 0.5 s with psutil.

Run: .venv/bin/python benchmarks/fl_simulation_scale.py [--clients 1000] [--rounds 10] [--fraction 0.05]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss_bytes(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.05)
    args = parser.parse_args()
    fedge = Path(sys.executable).parent / "fedge"
    out = Path(tempfile.mkdtemp(prefix="fedge-sim-")) / "run"
    argv = [str(fedge), "fl", "run", "--engine", "simulation", "--clients", str(args.clients), "--rounds", str(args.rounds),
            "--fraction-train", str(args.fraction), "--partition", "iid", "--local-epochs", "1", "--model", "mlp",
            "--out", str(out), "--json"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(root))
        time.sleep(0.5)
    wall = time.perf_counter() - started
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode != 0:
        sys.exit(f"fedge fl run failed (exit {proc.returncode}); see {out}")
    import json

    result = json.loads(stdout)
    steady = [m["round_s"] for m in result["metrics"][1:]]
    print(f"clients {args.clients}, fraction {args.fraction}, rounds {args.rounds}: wall {wall:.1f} s, "
          f"peak RSS of the process tree {peak / 2**30:.2f} GiB, accuracy {result['accuracy']:.3f}, "
          f"first round {result['metrics'][0]['round_s']:.1f} s, steady round {sum(steady) / max(len(steady), 1):.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
