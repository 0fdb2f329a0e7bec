"""Exporter plugins: one module per artefact (TFLite at each quantization, C array), each advertised under the
``fedge.exporters`` entry-point group like a third-party plugin would be."""

from fedge.edge.exporters.base import ExporterPlugin, TfliteExporterConfig

__all__ = ["ExporterPlugin", "TfliteExporterConfig"]
