"""The ``fedge edge export`` workflow: load a trained model, turn it into artefacts with the chosen exporter
plugin, verify the TFLite model on LiteRT (and TFLite Micro for int8 or a board), size its arena, check the
board, write the run directory.

Example::

    report = export_model("runs/fl-20260101-120000", ExportConfig(target="arduino-nano-33-ble-sense"))
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.config import to_mapping
from fedge.edge.boards import Board, Fit, check_fit, load_boards
from fedge.edge.convert import ConversionWorker, Quantization
from fedge.edge.exporters.base import Artefacts, ExporterPlugin, ExportSource, exporter_registry
from fedge.edge.source import SourceModel, load_source, run_source, source_kind, to_layout
from fedge.edge.verify import Verification, verify
from fedge.errors import ConfigError, Interrupted
from fedge.registry import Chosen
from fedge.rundir import RunDir

if TYPE_CHECKING:
    from fedge.plugins.data.base import ArrayDataset

__all__ = ["ExportConfig", "ExportWorkflow", "Exported", "export_model", "write_artefacts"]

DEFAULT_EXPORTER = "c-array"


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportConfig:
    """Settings of ``fedge edge export`` (flags, or keys of a TOML file)."""

    exporter: str = DEFAULT_EXPORTER
    """Exporter plugin (see ``fedge plugins --kind exporter``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Settings of the exporter's Config (``-o KEY=VALUE``; a ``[options]`` table in TOML)."""
    quantize: Quantization | None = None
    """Shortcut for the exporter's ``quantization`` option: none, float16, dynamic or int8."""
    dataset: str | None = None
    """Dataset plugin for calibration and held-out checks when model.json names none (then digits by default)."""
    target: str | None = None
    """Board to check flash and RAM against (see ``fedge edge boards``)."""


def quantization_of(chosen: Chosen[ExporterPlugin]) -> Quantization | None:
    """The quantization an exporter's Config asks for, if it has the option."""
    q = getattr(chosen.config, "quantization", None)
    return q if isinstance(q, Quantization) else None


def choose_exporter(cfg: ExportConfig) -> Chosen[ExporterPlugin]:
    """The exporter ``cfg`` names, its options validated (``--quantize`` folded in).

    Raises:
        ConfigError: unknown exporter, an option its Config lacks or refuses.
    """
    registry = exporter_registry()
    if cfg.exporter not in registry:
        raise ConfigError(
            f"unknown exporter {cfg.exporter!r}; valid: {', '.join(registry.names())} (see: fedge plugins --kind exporter)"
        )
    options = dict(cfg.options)
    if cfg.quantize is not None:
        if "quantization" not in getattr(registry.get(cfg.exporter).Config, "__dataclass_fields__", {}):
            raise ConfigError(f"exporter {cfg.exporter!r} has no quantization option; leave out --quantize")
        options["quantization"] = cfg.quantize
    return registry.choose(cfg.exporter, options, where=f"exporter.{cfg.exporter}")


def resolve_board(target: str | None, boards: str | Path | Mapping[str, Any] | None) -> Board | None:
    """The board ``--target`` names, or None without one.

    Raises:
        ConfigError: no such board (the message lists the valid ones).
    """
    if target is None:
        return None
    known = load_boards(boards)
    if target not in known:
        raise ConfigError(
            f"unknown board {target!r}; valid: {', '.join(sorted(known))} (or add one with --boards FILE)"
        )
    return known[target]


@contextlib.contextmanager
def run_dir(out: str | Path | None, *, overwrite: bool, kind: str = "edge") -> Iterator[RunDir]:
    """The core's run directory (a previous run refused, or replaced whole with ``overwrite``); one this made
    is removed again if the command fails before writing, so the same ``--out`` can be used for the retry."""
    fresh = out is None or not Path(out).is_dir() or not any(Path(out).iterdir())
    root_made = out is None and not Path("runs").exists()
    with RunDir.create(kind, out, overwrite=overwrite) as run:
        try:
            yield run
        except BaseException:
            if fresh:
                shutil.rmtree(run.path, ignore_errors=True)
            if root_made:
                with contextlib.suppress(OSError):
                    Path("runs").rmdir()
            raise


@dataclass(frozen=True, slots=True)
class Exported:
    """One model converted, verified and fitted to the board, not yet written."""

    artefacts: Artefacts
    check: Verification
    fit: Fit | None
    report: dict[str, Any]
    """``edge-report.json`` without ``run_dir``."""


class ExportWorkflow:
    """One export, as named steps: resolve the settings, load the model and its data, convert, verify, write.

    Args:
        source: what ``fedge edge export`` takes as MODEL.
        config: the command's settings.
        out: the run directory (None: ``runs/edge-<timestamp>``).
        boards: extra boards (a TOML path or a mapping of ``[boards.NAME]`` tables).
        overwrite: replace a run already in ``out`` (whole, once the new one is written).
        worker: a started conversion child to reuse (``fedge edge fit`` converts many candidates).
    """

    def __init__(
        self,
        source: str | Path,
        config: ExportConfig | None = None,
        *,
        out: str | Path | None = None,
        boards: str | Path | Mapping[str, Any] | None = None,
        overwrite: bool = False,
        worker: ConversionWorker | None = None,
    ) -> None:
        self.source_path = Path(source)
        self.config = config or ExportConfig()
        self.out = out
        self.overwrite = overwrite
        self.board = resolve_board(self.config.target, boards)
        self.exporter = choose_exporter(self.config)
        quant = quantization_of(self.exporter)
        if self.board is not None and quant is not None and not quant.runs_on_tflm:
            raise ConfigError(
                f"TFLite Micro on {self.board.name} cannot run {quant.value} models (no float16 or hybrid kernels); "
                "use --quantize int8 or none"
            )
        self.worker = worker

    def run(self) -> dict[str, Any]:
        """Export, verify, write; returns the report (also ``edge-report.json``) with ``run_dir`` added.

        Raises:
            DataError: missing/corrupt model, or ops TFLite Micro lacks (files are written first).
            ConfigError: the run directory cannot take the run, or the model does not fit the board (files
                written first).
            RuntimeFailure: the converter crashed, or LiteRT and TFLM disagree.
        """
        kind = source_kind(self.source_path)
        with contextlib.ExitStack() as stack:
            run = stack.enter_context(run_dir(self.out, overwrite=self.overwrite))
            if self.worker is None:  # starts importing its converter while the model and data load
                self.worker = stack.enter_context(ConversionWorker(kind))
            try:
                src = load_source(self.source_path)
                done = self.export_source(src, self.load_dataset(src))
                self.write(run, done.artefacts, done.report)
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted during the export of {self.source_path}; no run was written") from None
        report, check, fit = done.report, done.check, done.fit
        if check.problem is not None:
            raise type(check.problem)(f"{check.problem} (report in {report['run_dir']})") from check.problem
        if fit is not None and not fit.fits:
            raise ConfigError(f"{fit.message()} (report in {report['run_dir']})")
        return report

    def export_source(self, src: SourceModel, dataset: ArrayDataset) -> Exported:
        """Convert ``src`` with the exporter, verify it on ``dataset``'s held-out samples, fit it to the board;
        nothing is written (``fedge edge fit`` exports many candidates and writes one)."""
        source_out, shape = run_source(src, dataset.x_test, dataset=f"dataset {dataset.name!r}")
        x_train, x_test = to_layout(dataset.x_train, shape), to_layout(dataset.x_test, shape)
        accuracy_source = float((source_out.argmax(1) == dataset.y_test).mean())

        t0 = time.perf_counter()
        artefacts = self.convert(ExportSource(src.model, x_train, worker=self.worker))
        convert_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        check = verify(artefacts.edge, x_test, dataset.y_test, require_tflm=self.requires_tflm(artefacts))
        verify_s = time.perf_counter() - t1
        fit = None
        if self.board is not None:
            fit = check_fit(
                self.board, artefacts.edge.size_bytes, check.arena_bytes, quantization=artefacts.edge.quantization
            )

        report = self.report(src, dataset.name, artefacts, check, accuracy_source=accuracy_source, fit=fit)
        report.update(held_out_samples=len(x_test), convert_s=round(convert_s, 3), verify_s=round(verify_s, 3))
        return Exported(artefacts, check, fit, report)

    def load_dataset(self, src: SourceModel) -> ArrayDataset:
        """The dataset model.json names (with its options), else ``--dataset`` (digits by default).

        Raises:
            ConfigError: ``--dataset`` names another dataset than the one the model was trained on.
        """
        from fedge.plugins.data import load_dataset

        wanted = self.config.dataset
        if src.dataset and wanted and wanted != src.dataset:
            raise ConfigError(
                f"model.json names dataset {src.dataset!r}, the one the model was trained on; --dataset {wanted} "
                "would not be used: leave it out"
            )
        return load_dataset(src.dataset, src.dataset_options) if src.dataset else load_dataset(wanted or "digits")

    def convert(self, source: ExportSource) -> Artefacts:
        """The chosen exporter's artefacts."""
        artefacts = self.exporter.plugin.export(source, self.exporter.config)
        if not isinstance(artefacts, Artefacts):
            raise ConfigError(
                f"exporter {self.exporter.name!r} returned {type(artefacts).__name__}, not Artefacts; fix the plugin"
            )
        bad = [n for n in artefacts.files if Path(n).name != n or n in ("edge-report.json", "config.toml")]
        if bad:
            raise ConfigError(f"exporter {self.exporter.name!r} names a file it may not write: {bad[0]!r}")
        return artefacts

    def requires_tflm(self, artefacts: Artefacts) -> bool:
        """int8 models and any model for a board must run on TFLite Micro."""
        return artefacts.edge.quantization is Quantization.INT8 or self.board is not None

    def report(
        self,
        src: SourceModel,
        dataset: str,
        artefacts: Artefacts,
        check: Verification,
        *,
        accuracy_source: float,
        fit: Fit | None,
    ) -> dict[str, Any]:
        """``edge-report.json`` (without timings and the held-out count, which the caller adds)."""
        edge = artefacts.edge
        info = edge.info()
        report: dict[str, Any] = {
            "source": src.description,
            "source_kind": src.kind,
            "dataset": dataset,
            "quantization": edge.quantization.value,
            "exporter": self.exporter.name,
            "exporter_options": to_mapping(self.exporter.config),
            "files": sorted(artefacts.files),
            "size_bytes": edge.size_bytes,
            "arena_bytes": check.arena_bytes,
            "arena_min_bytes": check.arena_min_bytes,
            "ops": info.ops,
            "tflm_unsupported_ops": info.tflm_unsupported,
            "input": {"shape": info.inputs[0].shape, "dtype": info.inputs[0].dtype},
            "output": {"shape": info.outputs[0].shape, "dtype": info.outputs[0].dtype},
            "accuracy_source": accuracy_source,
            "accuracy_exported": check.accuracy_exported,
            "accuracy_drop_points": round(100 * (accuracy_source - check.accuracy_exported), 3),
            "runtimes": check.runtimes,
        }
        if self.board is not None and fit is not None:
            b = self.board
            report["board"] = {
                "name": b.name,
                "flash_bytes": b.flash_bytes,
                "ram_bytes": b.ram_bytes,
                "model_flash_bytes": b.model_flash_bytes,
                "arena_ram_bytes": b.arena_ram_bytes,
                "notes": b.notes,
            }
            report["fits"] = fit.fits
        return report

    def write(self, run: RunDir, artefacts: Artefacts, report: dict[str, Any]) -> None:
        """The artefacts, ``edge-report.json``, ``config.toml`` and ``metrics.jsonl`` into ``run``."""
        report["run_dir"] = str(Path(self.out) if self.out is not None else run.path)
        settings = {"model": str(self.source_path), **to_mapping(self.config)}
        run.write_config({k: v for k, v in settings.items() if v is not None and v != {}})
        write_artefacts(run, artefacts, report)
        run.append_metrics(
            {
                "stage": "export",
                "convert_s": report["convert_s"],
                "verify_s": report["verify_s"],
                "size_bytes": report["size_bytes"],
            }
        )


def write_artefacts(run: RunDir, artefacts: Artefacts, report: Mapping[str, Any]) -> None:
    """An export's files (model.tflite, the C array, ...) and its ``edge-report.json`` into ``run``."""
    for name, content in artefacts.files.items():
        run.write_bytes(name, content.encode("utf-8") if isinstance(content, str) else content)
    run.write_json("edge-report.json", dict(report))


def export_model(
    source: str | Path,
    config: ExportConfig | None = None,
    *,
    out: str | Path | None = None,
    boards: str | Path | Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``fedge edge export`` as a function: see :class:`ExportWorkflow`."""
    return ExportWorkflow(source, config, out=out, boards=boards, overwrite=overwrite).run()
