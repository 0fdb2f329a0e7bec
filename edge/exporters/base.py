"""What a TFLite ``exporter`` plugin provides, and the config the four of them share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from fedge.edge.convert import EdgeModel, Quantization, export_tflite

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ExporterPlugin", "TfliteExporter", "TfliteExporterConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TfliteExporterConfig:
    """Settings of every TFLite exporter."""

    calibration_samples: int = 200
    """How many training samples calibrate int8 activations (ignored by the other quantizations)."""

    def __post_init__(self) -> None:
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")


class ExporterPlugin(Protocol):
    """A TFLite exporter: a quantization, a nested ``Config`` and ``export``."""

    quantization: Quantization
    Config: type

    @staticmethod
    def export(model: object, sample_inputs: np.ndarray, config: TfliteExporterConfig) -> EdgeModel: ...


class TfliteExporter:
    """Base of the TFLite exporters: each names its quantization and inherits ``export``."""

    quantization: ClassVar[Quantization]
    Config: ClassVar[type[TfliteExporterConfig]] = TfliteExporterConfig

    @classmethod
    def export(cls, model: object, sample_inputs: np.ndarray, config: TfliteExporterConfig) -> EdgeModel:
        return export_tflite(
            model, sample_inputs, quantization=cls.quantization, calibration_samples=config.calibration_samples
        )
