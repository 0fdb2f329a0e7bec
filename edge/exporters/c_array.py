"""The ``c-array`` exporter: ``model.tflite`` plus ``model_data.cc`` + ``model_data.h`` for firmware that links
TFLite Micro."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.edge.csource import c_source, check_symbol
from fedge.edge.exporters.base import Artefacts, ExportSource, TfliteConfig
from fedge.registry import plugin


@plugin("exporter", "c-array")
class CArray:
    """TFLite model and its C source for TFLite Micro firmware: a 16-byte-aligned const array and its length."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(TfliteConfig):
        symbol: str = "g_model"
        """C name of the array; the length is SYMBOL_len."""

        def __post_init__(self) -> None:
            TfliteConfig.__post_init__(self)  # slots=True classes cannot use zero-argument super()
            check_symbol(self.symbol)

    @staticmethod
    def export(source: ExportSource, config: Config) -> Artefacts:
        edge = source.tflite(config.quantization, calibration_samples=config.calibration_samples)
        cc, header = c_source(edge.data, config.symbol)
        return Artefacts(edge=edge, files={"model.tflite": edge.data, "model_data.cc": cc, "model_data.h": header})
