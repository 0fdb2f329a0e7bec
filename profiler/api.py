"""The public API of fedge.profiler, re-exported by the package on first use (see its ``__all__``)."""

# ruff: noqa: F401 -- every import here is a re-export; the one list of them is the package's __all__

from fedge.profiler import __all__
from fedge.profiler.analyses.base import AnalysisPlugin, JobView
from fedge.profiler.analyses.collectives import collectives
from fedge.profiler.analyses.idle import idle_time
from fedge.profiler.analyses.kernel_breakdown import kernel_breakdown
from fedge.profiler.analyses.overlap import comm_comp_overlap
from fedge.profiler.analyses.recommendations import recommend
from fedge.profiler.analyses.stragglers import stragglers
from fedge.profiler.analyses.temporal import temporal_breakdown
from fedge.profiler.kinds import KernelKind, Mode
from fedge.profiler.report import Report, build_report, run_report
from fedge.profiler.trace import Job, Trace, load_job, load_trace

