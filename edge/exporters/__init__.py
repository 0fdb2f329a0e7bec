"""Exporter plugins: one module per artefact (``tflite``, ``c-array``), each advertised under the
``fedge.exporters`` entry-point group like a third-party plugin would be."""

from fedge.edge.exporters.base import Artefacts, ExporterPlugin, ExportSource, TfliteConfig, exporter_registry

__all__ = ["Artefacts", "ExportSource", "ExporterPlugin", "TfliteConfig", "exporter_registry"]
