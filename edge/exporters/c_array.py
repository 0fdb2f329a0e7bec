"""The ``c-array`` exporter: ``model_data.cc`` + ``model_data.h`` for firmware that links TFLite Micro."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.edge.convert import EdgeModel
from fedge.edge.csource import c_source, check_symbol
from fedge.registry import plugin


@plugin("exporter", "c-array")
class CArray:
    """C source for TFLite Micro firmware: a 16-byte-aligned const byte array and its length constant."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        symbol: str = "g_model"
        """C name of the array; the length is SYMBOL_len."""

        def __post_init__(self) -> None:
            check_symbol(self.symbol)

    @staticmethod
    def export(model: EdgeModel, config: Config) -> dict[str, str]:
        """File name -> text: ``model_data.cc`` and ``model_data.h``."""
        source, header = c_source(model.data, config.symbol)
        return {"model_data.cc": source, "model_data.h": header}
