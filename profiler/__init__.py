"""fedge.profiler: communication vs computation, per rank, from torch.profiler traces."""

if __name__ != "fedge.profiler":
    raise ImportError(
        f"this package must be imported as fedge.profiler, not {__name__!r}; install fedge "
        "(pip install -e .) and keep the repository root off sys.path"
    )

# The public API lives in fedge.profiler.api and is imported on first use, so that ``fedge profile --help``
# (which imports the CLI module of this package) does not pull in numpy and orjson.
__all__ = [
    "AnalysisPlugin",
    "Job",
    "JobView",
    "KernelKind",
    "Mode",
    "Report",
    "Trace",
    "build_report",
    "collectives",
    "comm_comp_overlap",
    "idle_time",
    "kernel_breakdown",
    "load_job",
    "load_trace",
    "recommend",
    "run_report",
    "stragglers",
    "temporal_breakdown",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'fedge.profiler' has no attribute {name!r}")
    from fedge.profiler import api

    return getattr(api, name)
