"""The ``tflite-float32`` exporter (see the class docstring)."""

from __future__ import annotations

from fedge.edge.convert import Quantization
from fedge.edge.exporters.base import TfliteExporter
from fedge.registry import plugin


@plugin("exporter", "tflite-float32")
class TfliteFloat32(TfliteExporter):
    """float32 TFLite model: the reference export; runs on LiteRT and TFLite Micro."""

    quantization = Quantization.NONE
