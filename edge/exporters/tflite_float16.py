"""The ``tflite-float16`` exporter (see the class docstring)."""

from __future__ import annotations

from fedge.edge.convert import Quantization
from fedge.edge.exporters.base import TfliteExporter
from fedge.registry import plugin


@plugin("exporter", "tflite-float16")
class TfliteFloat16(TfliteExporter):
    """float16-weight TFLite model: half the size of float32; LiteRT only (TFLM has no float16 kernels)."""

    quantization = Quantization.FLOAT16
