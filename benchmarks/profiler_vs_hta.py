"""fedge's profiler vs Holistic Trace Analysis (HTA) on the 53 MB trace set: load+analyse time and peak RSS,
as ratios. HTA is not installed: its numbers are read from the set's hta-reference.json (HTA 0.5.0,
``timing_repeats``: median load + temporal/overlap/kernel breakdown; ``maxrss_*_mb``: peak RSS).

fedge runs in a child process per repeat (load_job + build_report, mode hta), so its peak RSS is the
child's alone (resource.getrusage(RUSAGE_CHILDREN)).

Run:  .venv/bin/python benchmarks/profiler_vs_hta.py [--set DIR] [--repeats 3] [--big /tmp/fedge-big-trace.json]
(``--big``: also load+analyse a synthetic multi-GB trace made by benchmarks/make_big_trace.py and print its
peak RSS against the file size.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SET = Path(__file__).resolve().parents[2] / "shared" / "traces" / "hta-v100-2gpu-rank1-large"


def _child(path: str, mode: str) -> None:
    from fedge.profiler import build_report, load_job

    start, cpu_start = time.perf_counter(), time.process_time()
    job = load_job(path)
    report = build_report(job, mode=mode)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "ranks": len(report["ranks"]), "errors": len(report["errors"])}))


def _run_child(path: str, mode: str) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MB) of load+analyse in a fresh process. RUSAGE_CHILDREN is the max
    over all children a process waited for, so each measurement goes through its own intermediate process."""
    code = (
        "import json, resource, subprocess, sys;"
        f"p = subprocess.run([sys.executable, {__file__!r}, '--child', {path!r}, '--mode', {mode!r}],"
        " capture_output=True, text=True, check=True);"
        "out = json.loads(p.stdout.strip().splitlines()[-1]);"
        "out['maxrss_mb'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024;"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(out["seconds"]), float(out["cpu_seconds"]), float(out["maxrss_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default=str(DEFAULT_SET), help="trace set directory with hta-reference.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="hta")
    parser.add_argument("--big", default=None, help="also measure this synthetic multi-GB trace")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.mode)
        return
    ref = json.loads((Path(args.set) / "hta-reference.json").read_text())
    reps = ref["timing_repeats"]
    hta_s = reps["load_s_median"] + reps["analyze_s_median"]
    hta_mb = ref["maxrss_self_mb"] + ref.get("maxrss_children_mb", 0.0)
    runs = [_run_child(args.set, args.mode) for _ in range(args.repeats)]
    fedge_s = statistics.median(r[0] for r in runs)
    fedge_cpu = statistics.median(r[1] for r in runs)
    fedge_mb = max(r[2] for r in runs)
    print(f"set: {Path(args.set).name} ({sum(f.stat().st_size for f in Path(args.set).glob('*.gz')) / 1e6:.1f} MB gz)")
    print(f"HTA 0.5.0 (reference): load+analyse {hta_s:.3f} s (median of {reps['repeats']}), peak RSS {hta_mb:.1f} MB")
    print(f"fedge ({args.mode} mode):   load+analyse {fedge_s:.3f} s (median of {args.repeats}: "
          f"{', '.join(f'{r[0]:.3f}' for r in runs)}), peak RSS {fedge_mb:.1f} MB")
    print(f"fedge CPU time (user+sys, immune to other load on the machine): {fedge_cpu:.3f} s (median); "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"speed-up: {hta_s / fedge_s:.1f}x faster by wall time, {hta_s / fedge_cpu:.1f}x by CPU time (target >= 5x)")
    print(f"memory:   {fedge_mb / hta_mb:.2f}x HTA's peak RSS (target <= 0.5x)")
    if args.big:
        size_mb = os.path.getsize(args.big) / 1e6
        seconds, _, mb = _run_child(args.big, "fedge")
        print(f"big trace: {args.big} {size_mb:,.0f} MB: load+analyse {seconds:.1f} s, peak RSS {mb:,.0f} MB "
              f"({mb / size_mb:.2f}x the file size)")


if __name__ == "__main__":
    main()
