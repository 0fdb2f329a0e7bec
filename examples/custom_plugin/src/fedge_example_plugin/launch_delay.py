"""Kernel launch delay as a fedge ``analysis`` plugin: how long each GPU kernel waited between the CPU
launch call returning and the kernel starting.

Install: pip install ./examples/custom_plugin; then ``fedge profile report TRACES`` shows it in the terminal,
``--html`` and ``--json`` (under "analyses"), and ``-o launch-delay.threshold_us=50`` sets its option.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.profiler.analyses.base import AnalysisConfig, JobView, Result
from fedge.profiler.timeline import launch_rows
from fedge.registry import plugin


@dataclass(frozen=True, slots=True)
class RankDelay:
    """One rank's launch delays (µs) over the ``kernels`` whose launch was recorded; None when there were none."""

    rank: int
    kernels: int
    mean_us: float | None
    p50_us: float | None
    max_us: float | None
    over_threshold: int


@dataclass(frozen=True, slots=True)
class LaunchDelays(Result):
    """Kernel launch delay per rank (us); over_threshold counts delays above threshold_us."""

    threshold_us: float
    rows: tuple[RankDelay, ...]


@plugin("analysis", "launch-delay")
class LaunchDelay:
    """Kernel launch delay per rank: GPU start minus the end of the CPU launch call."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(AnalysisConfig):
        threshold_us: float = 100.0
        """Delays above this are counted as long."""

    @staticmethod
    def run(view: JobView, config: Config) -> LaunchDelays:
        rows = []
        for trace in view.traces:
            k = view.kernels(trace)
            launch = launch_rows(trace, trace.gpu.corr[k.row])
            ok = launch >= 0
            delay = k.ts[ok] - (trace.cpu.ts[launch[ok]] + trace.cpu.dur[launch[ok]])
            if len(delay):
                rows.append(RankDelay(trace.rank, len(delay), float(delay.mean()), float(np.median(delay)),
                                      float(delay.max()), int((delay > config.threshold_us).sum())))
            else:
                rows.append(RankDelay(trace.rank, 0, None, None, None, 0))
        return LaunchDelays(threshold_us=config.threshold_us, rows=tuple(rows))
