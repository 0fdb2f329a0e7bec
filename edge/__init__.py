"""fedge.edge: TFLite export for microcontrollers and phones, verified on LiteRT and TFLite Micro."""

if __name__ != "fedge.edge":
    raise ImportError(
        f"this package must be imported as fedge.edge, not {__name__!r}; install fedge "
        "(pip install -e .) and keep the repository root off sys.path"
    )
