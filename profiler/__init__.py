"""fedge.profiler: communication vs computation, per rank, from torch.profiler traces."""

if __name__ != "fedge.profiler":
    raise ImportError(
        f"this package must be imported as fedge.profiler, not {__name__!r}; install fedge "
        "(pip install -e .) and keep the repository root off sys.path"
    )

# The public API is imported on first use, so that ``fedge profile --help`` (which imports the CLI module of
# this package) does not pull in numpy and orjson.
__all__ = [
    "Job",
    "KernelKind",
    "Mode",
    "Trace",
    "build_report",
    "collectives",
    "comm_comp_overlap",
    "idle_time",
    "kernel_breakdown",
    "load_job",
    "load_trace",
    "recommend",
    "stragglers",
    "temporal_breakdown",
]

_WHERE = {
    "Job": "trace",
    "Trace": "trace",
    "load_job": "trace",
    "load_trace": "trace",
    "KernelKind": "kinds",
    "Mode": "kinds",
    "build_report": "report",
    "collectives": "analyses.collectives",
    "comm_comp_overlap": "analyses.overlap",
    "idle_time": "analyses.idle",
    "kernel_breakdown": "analyses.kernel_breakdown",
    "recommend": "analyses.recommendations",
    "stragglers": "analyses.stragglers",
    "temporal_breakdown": "analyses.temporal",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedge.profiler' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"fedge.profiler.{_WHERE[name]}"), name)
