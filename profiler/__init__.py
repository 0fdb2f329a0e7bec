"""fedge.profiler: communication vs computation, per rank, from torch.profiler traces."""

if __name__ != "fedge.profiler":
    raise ImportError(
        f"this package must be imported as fedge.profiler, not {__name__!r}; install fedge "
        "(pip install -e .) and keep the repository root off sys.path"
    )
