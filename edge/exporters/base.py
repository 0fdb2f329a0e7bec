"""What an ``exporter`` plugin is: :class:`ExporterPlugin`, the :class:`ExportSource` it reads and the
:class:`Artefacts` it returns; and the Config the TFLite exporters share.

An exporter turns a trained model into the files a device needs. Whatever else it writes, it names the TFLite
model those files hold (``Artefacts.edge``), so every export is verified on LiteRT and TFLite Micro the same
way. Example of a third-party one::

    @plugin("exporter", "my-format")
    class MyFormat:
        @dataclass(frozen=True, kw_only=True, slots=True)
        class Config(TfliteConfig):
            suffix: str = ".bin"

        @staticmethod
        def export(source: ExportSource, config: Config) -> Artefacts:
            edge = source.tflite(config.quantization, calibration_samples=config.calibration_samples)
            return Artefacts(edge=edge, files={f"model{config.suffix}": edge.data})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from fedge.edge.convert import ConversionWorker, EdgeModel, Quantization, export_tflite
from fedge.registry import Kind, Registry

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Artefacts", "ExportSource", "ExporterPlugin", "TfliteConfig", "exporter_registry"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TfliteConfig:
    """Settings of every exporter that converts to TFLite."""

    quantization: Quantization = Quantization.INT8
    """none, float16, dynamic or int8 (``--quantize`` sets it)."""
    calibration_samples: int = 200
    """Training samples that calibrate int8 activations (ignored by the other quantizations)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantization", Quantization.parse(str(self.quantization)))
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")


class ExportSource:
    """What an exporter reads: the trained model, training samples in its input layout, and the TFLite converter.

    ``tflite()`` converts once per (quantization, calibration samples) and keeps the result, so exporters and
    the export workflow may ask for the same model twice at no cost.

    Args:
        model: a torch ``nn.Module``, or a Keras ``.keras``/SavedModel path.
        sample_inputs: training samples, batch first, in the model's input layout (calibration).
        worker: the conversion child to convert in (None: one child per conversion).
    """

    def __init__(self, model: object, sample_inputs: np.ndarray, *, worker: ConversionWorker | None = None) -> None:
        self.model = model
        self.sample_inputs = sample_inputs
        self._worker = worker
        self._converted: dict[tuple[Quantization, int], EdgeModel] = {}

    def tflite(self, quantization: Quantization | str, *, calibration_samples: int = 200) -> EdgeModel:
        """The model converted to TFLite (fixed batch of 1); see :func:`fedge.edge.export_tflite`."""
        key = (Quantization.parse(str(quantization)), calibration_samples)
        if key not in self._converted:
            self._converted[key] = export_tflite(
                self.model,
                self.sample_inputs,
                quantization=key[0],
                calibration_samples=calibration_samples,
                worker=self._worker,
            )
        return self._converted[key]


@dataclass(frozen=True, slots=True)
class Artefacts:
    """What an exporter produced: files for the run directory, and the TFLite model they hold."""

    edge: EdgeModel
    """The TFLite model the files hold or derive from: verified on LiteRT (and TFLM), sized, fitted to a board."""
    files: Mapping[str, bytes | str] = field(default_factory=dict)
    """File name (no directories) -> contents, written atomically into the run directory."""


@runtime_checkable
class ExporterPlugin(Protocol):
    """An ``exporter`` plugin: a nested ``Config`` dataclass and ``export(source, config) -> Artefacts``."""

    Config: ClassVar[type]

    @staticmethod
    def export(source: ExportSource, config: Any) -> Artefacts: ...


def exporter_registry() -> Registry[ExporterPlugin]:
    """The installed exporters (fedge's own and third-party ones, found the same way)."""
    return Registry(Kind.EXPORTER)
