"""The ``tflite-float32`` exporter (see the class docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedge.edge.convert import EdgeModel, Quantization, export_tflite
from fedge.edge.exporters.base import TfliteExporterConfig

from fedge.registry import plugin

if TYPE_CHECKING:
    import numpy as np


@plugin("exporter", "tflite-float32")
class TfliteFloat32:
    """float32 TFLite model: the reference export; runs on LiteRT and TFLite Micro."""

    quantization = Quantization.NONE

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(TfliteExporterConfig):
        pass

    @staticmethod
    def export(model: object, sample_inputs: np.ndarray, config: TfliteExporterConfig) -> EdgeModel:
        return export_tflite(
            model, sample_inputs, quantization=Quantization.NONE, calibration_samples=config.calibration_samples
        )
