"""fedge's profiler vs Holistic Trace Analysis (HTA) on the 53 MB trace set: load+analyse time and peak RSS,
as ratios. HTA runs live from a venv of its own with --hta-python; otherwise its numbers are read from the set's hta-reference.json (HTA 0.5.0,
``timing_repeats``: median load + temporal/overlap/kernel breakdown; ``maxrss_*_mb``: peak RSS).

fedge runs in a child process per repeat (load_job + build_report, mode hta), so its peak RSS is the
child's alone (resource.getrusage(RUSAGE_CHILDREN)).

It also prints the naive floor, gzip + orjson.loads of the same files in a fresh process, and fedge's time
as a ratio to it.

Run:  .venv/bin/python benchmarks/profiler_vs_hta.py [--set DIR] [--repeats 3] [--big /tmp/fedge-big-trace.json]
      [--synthetic 0.5,1.5,4] [--hta-python /tmp/hta-venv/bin/python]
(``--hta-python``: run HTA 0.5.0 live from a venv of its own, made with
``python3 -m venv /tmp/hta-venv && /tmp/hta-venv/bin/pip install HolisticTraceAnalysis==0.5.0``, instead of
reading its stored times;
``--big``: also load+analyse a synthetic multi-GB trace made by benchmarks/make_big_trace.py and print its
peak RSS against the file size; ``--synthetic``: make one of each size in GB under /tmp, measure time and
peak RSS of each, delete it.)
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


def _floor_child(path: str) -> None:
    import zlib

    import orjson

    start, cpu_start = time.perf_counter(), time.process_time()
    for f in _trace_files(path):
        raw = f.read_bytes()
        orjson.loads(zlib.decompress(raw, 16 + zlib.MAX_WBITS) if raw[:2] == b"\x1f\x8b" else raw)
    print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}))


def _trace_files(path: str) -> list[Path]:
    p = Path(path)
    return sorted(f for f in p.glob("*.json*") if "reference" not in f.name) if p.is_dir() else [p]


def _floor(path: str) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, __file__, "--floor", path], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(out["seconds"]), float(out["cpu_seconds"])


# HTA 0.5 in its own interpreter: TraceAnalysis (parse, align, filter) plus the breakdowns its reference times
# cover, on a folder holding the trace files only (HTA reads every JSON file it finds).
_HTA_CHILD = """
import json, os, resource, sys, tempfile, time
from pathlib import Path
from hta.trace_analysis import TraceAnalysis
with tempfile.TemporaryDirectory() as tmp:
    for f in sys.argv[1:]:
        os.symlink(f, Path(tmp) / Path(f).name)
    start, cpu = time.perf_counter(), time.process_time()
    analysis = TraceAnalysis(trace_dir=tmp)
    analysis.get_temporal_breakdown(visualize=False)
    analysis.get_comm_comp_overlap(visualize=False)
    analysis.get_gpu_kernel_breakdown(visualize=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
children = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu + children.ru_utime + children.ru_stime,
                  "maxrss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + children.ru_maxrss) / 1024}))
"""


def _hta_live(python: str, path: str) -> tuple[float, float, float]:
    files = [str(f.resolve()) for f in _trace_files(path)]
    proc = subprocess.run([python, "-c", _HTA_CHILD, *files], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(out["seconds"]), float(out["cpu_seconds"]), float(out["maxrss_mb"])


def _synthetic(sizes_gb: list[float]) -> None:
    maker = Path(__file__).with_name("make_big_trace.py")
    for gb in sizes_gb:
        path = f"/tmp/fedge-synthetic-{gb:g}gb.json"
        try:
            subprocess.run([sys.executable, str(maker), "--gb", str(gb), "--out", path], check=True, capture_output=True)
            size_mb = os.path.getsize(path) / 1e6
            seconds, _, mb = _run_child(path, "fedge")
            print(f"synthetic {size_mb:,.0f} MB: load+analyse {seconds:.1f} s ({seconds / size_mb * 1000:.1f} s/GB), "
                  f"peak RSS {mb:,.0f} MB ({mb / size_mb:.2f}x the file size)")
        finally:
            Path(path).unlink(missing_ok=True)


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
    parser.add_argument("--synthetic", default=None, help="comma-separated sizes in GB of synthetic traces to measure")
    parser.add_argument("--hta-python", default=None,
                        help="python of a venv with HolisticTraceAnalysis==0.5.0: run HTA live instead of reading its stored times")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--floor", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.mode)
        return
    if args.floor:
        _floor_child(args.floor)
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
    hta_cpu = None
    if args.hta_python:
        live = [_hta_live(args.hta_python, args.set) for _ in range(args.repeats)]
        hta_s, hta_cpu = statistics.median(r[0] for r in live), statistics.median(r[1] for r in live)
        hta_mb = max(r[2] for r in live)
        print(f"HTA 0.5.0 (live, {args.hta_python}): load+analyse {hta_s:.3f} s wall, {hta_cpu:.3f} s CPU "
              f"(median of {args.repeats}), peak RSS {hta_mb:.1f} MB")
    print(f"fedge ({args.mode} mode):   load+analyse {fedge_s:.3f} s (median of {args.repeats}: "
          f"{', '.join(f'{r[0]:.3f}' for r in runs)}), peak RSS {fedge_mb:.1f} MB")
    print(f"fedge CPU time (user+sys, immune to other load on the machine): {fedge_cpu:.3f} s (median); "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"speed-up: {hta_s / fedge_s:.1f}x faster by wall time, {(hta_cpu or hta_s) / fedge_cpu:.1f}x by CPU time "
          "(target >= 10x)")
    print(f"memory:   {fedge_mb / hta_mb:.2f}x HTA's peak RSS (target <= 0.5x)")
    floors = [_floor(args.set) for _ in range(args.repeats)]
    floor_s, floor_cpu = statistics.median(f[0] for f in floors), statistics.median(f[1] for f in floors)
    print(f"floor:    gzip + orjson.loads {floor_s:.3f} s wall, {floor_cpu:.3f} s CPU (median of {args.repeats}); fedge is "
          f"{fedge_s / floor_s:.2f}x it by wall time, {fedge_cpu / floor_cpu:.2f}x by CPU time (target <= 1.1x)")
    if args.big:
        size_mb = os.path.getsize(args.big) / 1e6
        seconds, _, mb = _run_child(args.big, "fedge")
        print(f"big trace: {args.big} {size_mb:,.0f} MB: load+analyse {seconds:.1f} s, peak RSS {mb:,.0f} MB "
              f"({mb / size_mb:.2f}x the file size)")
    if args.synthetic:
        _synthetic([float(x) for x in args.synthetic.split(",")])


if __name__ == "__main__":
    main()
