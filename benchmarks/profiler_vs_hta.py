"""fedge's profiler vs Holistic Trace Analysis (HTA) 0.5 and the gzip + orjson floor, whole process: wall time,
CPU time (user+sys of the process and its workers, what other load on the machine barely changes) and peak RSS
of each command, start-up and imports included, measured with os.wait4 on that process alone.

It prints, in one run: the largest shared single-rank trace and a shared multi-rank set, each as
``fedge profile report --json --mode hta`` vs HTA (``TraceAnalysis`` + temporal/overlap/kernel breakdowns, live
from a venv of its own with --hta-python, else the set's stored hta-reference.json times, which exclude
HTA's imports) vs the floor (``gzip`` + ``orjson.loads`` of the same files, one after the other); then, with
--synthetic, ``fedge profile report`` on synthetic traces of the given sizes (benchmarks/make_big_trace.py):
time, CPU and peak RSS against the file size.

Run:  .venv/bin/python benchmarks/profiler_vs_hta.py --repeats 3 --hta-python /tmp/hta-venv/bin/python \
      --synthetic 0.5,1.5,4
(``--hta-python``: a venv made with ``python3 -m venv /tmp/hta-venv && /tmp/hta-venv/bin/pip install
HolisticTraceAnalysis==0.5.0 'pandas<3'``; ``--single``/``--multi``: other trace sets; ``--big FILE``: also an
existing multi-GB trace; ``--synthetic-ranks GB``: also a synthetic 2-rank set of GB per rank against HTA.) About
6 minutes at --repeats 3 --synthetic 0.5,1.5,4 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEFAULT_SINGLE = TRACES / "hta-v100-2gpu-rank1-large"
DEFAULT_MULTI = TRACES / "hta-sampled-128gpu-2rank"


def _floor_child(path: str) -> None:
    import zlib

    import orjson

    for f in _trace_files(path):
        raw = f.read_bytes()
        orjson.loads(zlib.decompress(raw, 16 + zlib.MAX_WBITS) if raw[:2] == b"\x1f\x8b" else raw)


def _trace_files(path: str) -> list[Path]:
    p = Path(path)
    return sorted(f for f in p.glob("*.json*") if "reference" not in f.name) if p.is_dir() else [p]


# HTA 0.5 in its own interpreter: TraceAnalysis (parse, align, filter) plus the breakdowns its reference times
# cover, on a folder holding the trace files only (HTA reads every JSON file it finds).
_HTA_CHILD = """
import os, sys, tempfile
from pathlib import Path
from hta.trace_analysis import TraceAnalysis
with tempfile.TemporaryDirectory() as tmp:
    for f in sys.argv[1:]:
        os.symlink(f, Path(tmp) / Path(f).name)
    analysis = TraceAnalysis(trace_dir=tmp)
    analysis.get_temporal_breakdown(visualize=False)
    analysis.get_comm_comp_overlap(visualize=False)
    analysis.get_gpu_kernel_breakdown(visualize=False)
"""


# Children may cache bytecode, as an installed package has it (HTA's venv does): a PYTHONDONTWRITEBYTECODE
# inherited from the shell would otherwise make fedge compile its modules on every run.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one command and the processes it waited for, start-up included. The peak
    is that of the largest single process (``ru_maxrss``), not the sum over a command and its workers."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code not in (0, 2):  # 2: fedge read some files only
            err.seek(0)
            raise SystemExit(f"{cmd[0]} exited {code}: {err.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _median(cmd: list[str], repeats: int) -> tuple[float, float, float]:
    """Medians of wall and CPU time and the largest peak RSS over ``repeats`` runs, after one unmeasured run
    (bytecode written, files in the page cache, for every command alike)."""
    _measure(cmd)
    runs = [_measure(cmd) for _ in range(repeats)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), max(r[2] for r in runs))


def _fedge_cmd(path: str | Path, mode: str) -> list[str]:
    return [str(Path(sys.executable).with_name("fedge")), "profile", "report", str(path), "--json", "--mode", mode]


def _hta_cmd(python: str, path: Path) -> list[str]:
    return [python, "-c", _HTA_CHILD, *(str(f.resolve()) for f in _trace_files(str(path)))]


def _compare(label: str, path: Path, args: argparse.Namespace) -> None:
    """One trace set: fedge vs HTA vs the floor, whole process, median of --repeats."""
    files = _trace_files(str(path))
    disk_mb = sum(f.stat().st_size for f in files) / 1e6
    fedge = _median(_fedge_cmd(path, args.mode), args.repeats)
    floor = _median([sys.executable, __file__, "--floor", str(path)], args.repeats)
    print(f"{label}: {path.name} ({len(files)} file(s), {disk_mb:.1f} MB on disk)")
    print(f"  fedge profile report ({args.mode} mode): {fedge[0]:.3f} s wall, {fedge[1]:.3f} s CPU, peak RSS {fedge[2]:.1f} MB")
    if args.hta_python:
        hta = _median(_hta_cmd(args.hta_python, path), args.repeats)
        source = "live"
    else:
        ref = json.loads((path / "hta-reference.json").read_text())
        reps = ref["timing_repeats"]
        seconds = reps["load_s_median"] + reps["analyze_s_median"]
        hta = (seconds, seconds, ref["maxrss_self_mb"] + ref.get("maxrss_children_mb", 0.0))
        source = "stored, imports not included; its CPU figure is its wall time"
    print(f"  HTA 0.5.0 ({source}): {hta[0]:.3f} s wall, {hta[1]:.3f} s CPU, peak RSS {hta[2]:.1f} MB")
    print(f"  floor (gzip + orjson.loads): {floor[0]:.3f} s wall, {floor[1]:.3f} s CPU")
    print(f"  fedge is {hta[0] / fedge[0]:.1f}x faster than HTA by wall time, {hta[1] / fedge[1]:.1f}x by CPU time "
          f"(target >= 10x); {fedge[0] / floor[0]:.2f}x the floor by wall time, {fedge[1] / floor[1]:.2f}x by CPU "
          f"time (target <= 1.1x); {fedge[2] / hta[2]:.2f}x HTA's peak RSS (median of {args.repeats})")


def _synthetic(sizes_gb: list[float], mode: str) -> None:
    maker = Path(__file__).with_name("make_big_trace.py")
    for gb in sizes_gb:
        path = f"/tmp/fedge-synthetic-{gb:g}gb.json"
        try:
            subprocess.run([sys.executable, str(maker), "--gb", str(gb), "--out", path], check=True, capture_output=True)
            _big(path, mode)
        finally:
            Path(path).unlink(missing_ok=True)


def _synthetic_ranks(gb: float, args: argparse.Namespace) -> None:
    """A synthetic 2-rank set of ``gb`` GB per rank: fedge vs HTA vs the floor, as the shared sets (one run each:
    HTA takes minutes here)."""
    maker = Path(__file__).with_name("make_big_trace.py")
    with tempfile.TemporaryDirectory(prefix="fedge-synthetic-ranks-") as tmp:
        for rank in range(2):
            out = Path(tmp) / f"rank-{rank}.json"
            subprocess.run([sys.executable, str(maker), "--gb", str(gb), "--rank", str(rank), "--out", str(out)],
                           check=True, capture_output=True)  # fmt: skip
        _compare(f"synthetic 2-rank set, {gb:g} GB per rank", Path(tmp), argparse.Namespace(**{**vars(args), "repeats": 1}))


def _big(path: str, mode: str) -> None:
    size_mb = os.path.getsize(path) / 1e6
    wall, cpu, mb = _measure(_fedge_cmd(path, mode))
    print(f"synthetic {size_mb:,.0f} MB: fedge profile report {wall:.1f} s wall, {cpu:.1f} s CPU "
          f"({cpu / size_mb * 1000:.1f} s CPU/GB), peak RSS {mb:,.0f} MB ({mb / size_mb:.3f}x the file size; target <= 0.1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", default=str(DEFAULT_SINGLE), help="a single-rank trace set with hta-reference.json")
    parser.add_argument("--multi", default=str(DEFAULT_MULTI), help="a multi-rank trace set with hta-reference.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="hta")
    parser.add_argument("--big", default=None, help="also measure this synthetic multi-GB trace")
    parser.add_argument("--synthetic", default=None, help="comma-separated sizes in GB of synthetic traces to measure")
    parser.add_argument("--synthetic-ranks", type=float, default=None,
                        help="GB per rank of a synthetic 2-rank set to compare with HTA too (e.g. 0.1)")
    parser.add_argument("--hta-python", default=None,
                        help="python of a venv with HolisticTraceAnalysis==0.5.0: run HTA live instead of reading its stored times")
    parser.add_argument("--floor", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        _floor_child(args.floor)
        return
    if args.synthetic_ranks and not args.hta_python:
        parser.error("--synthetic-ranks compares with HTA live, which has no stored times for it: give --hta-python")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    _compare("largest single-rank set", Path(args.single), args)
    _compare("multi-rank set", Path(args.multi), args)
    if args.synthetic_ranks:
        _synthetic_ranks(args.synthetic_ranks, args)
    if args.big:
        _big(args.big, "fedge")
    if args.synthetic:
        _synthetic([float(x) for x in args.synthetic.split(",")], "fedge")


if __name__ == "__main__":
    main()
