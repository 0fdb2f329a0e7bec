"""The ``tflite-int8`` exporter (see the class docstring)."""

from __future__ import annotations

from fedge.edge.convert import Quantization
from fedge.edge.exporters.base import TfliteExporter
from fedge.registry import plugin


@plugin("exporter", "tflite-int8")
class TfliteInt8(TfliteExporter):
    """Full-integer int8 TFLite model (int8 input/output), calibrated on real samples; for TFLite Micro."""

    quantization = Quantization.INT8
