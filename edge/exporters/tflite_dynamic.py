"""The ``tflite-dynamic`` exporter (see the class docstring)."""

from __future__ import annotations

from fedge.edge.convert import Quantization
from fedge.edge.exporters.base import TfliteExporter
from fedge.registry import plugin


@plugin("exporter", "tflite-dynamic")
class TfliteDynamic(TfliteExporter):
    """Dynamic-range TFLite model: int8 weights, float activations; LiteRT only (TFLM has no hybrid kernels)."""

    quantization = Quantization.DYNAMIC
