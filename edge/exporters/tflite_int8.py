"""The ``tflite-int8`` exporter (see the class docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedge.edge.convert import EdgeModel, Quantization, export_tflite
from fedge.edge.exporters.base import TfliteExporterConfig

from fedge.registry import plugin

if TYPE_CHECKING:
    import numpy as np


@plugin("exporter", "tflite-int8")
class TfliteInt8:
    """Full-integer int8 TFLite model (int8 input/output), calibrated on real samples; for TFLite Micro."""

    quantization = Quantization.INT8

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(TfliteExporterConfig):
        pass

    @staticmethod
    def export(model: object, sample_inputs: np.ndarray, config: TfliteExporterConfig) -> EdgeModel:
        return export_tflite(
            model, sample_inputs, quantization=Quantization.INT8, calibration_samples=config.calibration_samples
        )
