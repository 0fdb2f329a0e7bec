"""The ``tflite`` exporter: ``model.tflite`` at the quantization its Config names."""

from __future__ import annotations

from fedge.edge.exporters.base import Artefacts, ExportSource, TfliteConfig
from fedge.registry import plugin


@plugin("exporter", "tflite")
class Tflite:
    """A TFLite model (float32, float16, dynamic-range or full int8) for LiteRT and TFLite Micro."""

    Config = TfliteConfig

    @staticmethod
    def export(source: ExportSource, config: TfliteConfig) -> Artefacts:
        edge = source.tflite(config.quantization, calibration_samples=config.calibration_samples)
        return Artefacts(edge=edge, files={"model.tflite": edge.data})
