"""fedge.edge: TFLite export for microcontrollers and phones, verified on LiteRT and TFLite Micro."""

if __name__ != "fedge.edge":
    raise ImportError(
        f"this package must be imported as fedge.edge, not {__name__!r}; install fedge "
        "(pip install -e .) and keep the repository root off sys.path"
    )

from fedge.edge.boards import Board, Fit, check_fit, load_boards
from fedge.edge.convert import EdgeModel, Quantization, export_tflite, load_edge_model
from fedge.edge.csource import c_source
from fedge.edge.tflite_info import ModelInfo, TensorInfo, inspect_tflite

__all__ = [
    "Board",
    "EdgeModel",
    "Fit",
    "ModelInfo",
    "Quantization",
    "TensorInfo",
    "c_source",
    "check_fit",
    "export_model",
    "export_tflite",
    "fit_model",
    "inspect_tflite",
    "load_boards",
    "load_edge_model",
]


def __getattr__(name: str) -> object:
    # export_model and fit_model pull in the dataset and model plugins (torch): load them only when asked for.
    if name == "export_model":
        from fedge.edge.export_workflow import export_model

        return export_model
    if name == "fit_model":
        from fedge.edge.fit import fit_model

        return fit_model
    raise AttributeError(f"module 'fedge.edge' has no attribute {name!r}")
