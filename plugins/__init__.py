"""fedge's built-in plugins: datasets, models, strategies and aggregators (imported as ``fedge.plugins``)."""

if __name__ != "fedge.plugins":
    raise ImportError(
        f"this package must be imported as fedge.plugins, not {__name__!r}; install fedge "
        "(pip install -e .) and keep the repository root off sys.path"
    )
