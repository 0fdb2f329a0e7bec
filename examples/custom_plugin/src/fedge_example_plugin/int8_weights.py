"""The int8 weights of a model as a NumPy ``.npz``, as a fedge ``exporter`` plugin: for firmware that calls
CMSIS-NN (or its own kernels) directly instead of linking TensorFlow Lite Micro.

Install: ``pip install ./examples/custom_plugin``; then
``fedge edge export RUN --exporter int8-weights`` writes ``weights.npz`` beside the verified ``model.tflite``.

The arrays are the ones the int8 TFLite model holds (so they are exactly what LiteRT and TFLM were checked
running): for the k-th CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED op, ``opK.weight`` (int8),
``opK.weight_scale`` (float32, one per output channel), ``opK.bias`` (int32) and ``opK.bias_scale``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from fedge.edge import Quantization
from fedge.edge.exporters.base import Artefacts, ExportSource
from fedge.edge.tflite_info import operator_names
from fedge.errors import DataError
from fedge.registry import plugin

_LAYER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def layer_arrays(data: bytes) -> dict[str, np.ndarray]:
    """``opK.weight``, ``opK.weight_scale``, ``opK.bias``, ``opK.bias_scale`` of every weighted op in ``data``."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    model = fb.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    arrays: dict[str, np.ndarray] = {}
    for k, name in enumerate(operator_names(model)):
        if name not in _LAYER_OPS:
            continue
        inputs = graph.Operators(k).InputsAsNumpy()
        for role, index in zip(("weight", "bias"), inputs[1:3], strict=False):
            if index < 0:  # no bias
                continue
            tensor = graph.Tensors(int(index))
            raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
            dtype = np.int8 if role == "weight" else np.int32
            arrays[f"op{k}.{role}"] = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(tensor.ShapeAsNumpy())
            arrays[f"op{k}.{role}_scale"] = tensor.Quantization().ScaleAsNumpy().astype(np.float32)
    return arrays


@plugin("exporter", "int8-weights")
class Int8Weights:
    """int8 weights and per-channel scales of each conv/dense layer as weights.npz, beside the int8 model.tflite."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        calibration_samples: int = 200
        """Training samples that calibrate int8 activations."""
        compressed: bool = True
        """Write the .npz zip-compressed (np.savez_compressed)."""

        def __post_init__(self) -> None:
            if self.calibration_samples < 1:
                raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")

    @staticmethod
    def export(source: ExportSource, config: Config) -> Artefacts:
        edge = source.tflite(Quantization.INT8, calibration_samples=config.calibration_samples)
        arrays = layer_arrays(edge.data)
        if not arrays:
            raise DataError("the model has no CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED layer to take weights from")
        buf = io.BytesIO()
        (np.savez_compressed if config.compressed else np.savez)(buf, **arrays)
        return Artefacts(edge=edge, files={"model.tflite": edge.data, "weights.npz": buf.getvalue()})
