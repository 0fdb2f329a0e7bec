"""The ``fedge edge export`` workflow: load a trained model, turn it into artefacts with the chosen exporter
plugin, verify the TFLite model on LiteRT (and TFLite Micro for int8 or a board), size its arena, check the
board, write the run directory.

Example::

    report = export_model("runs/fl-20260101-120000", ExportConfig(target="arduino-nano-33-ble-sense"))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.config import from_mapping, to_mapping
from fedge.edge.boards import Board, Fit, check_fit, load_boards
from fedge.edge.convert import ConversionWorker, Quantization
from fedge.edge.exporters.base import Artefacts, ExporterPlugin, ExportSource, exporter_registry
from fedge.edge.source import SourceModel, load_source, run_source, source_kind, to_layout
from fedge.edge.verify import Verification, verify
from fedge.errors import ConfigError, FedgeError, PluginNotFoundError
from fedge.rundir import RunDir

if TYPE_CHECKING:
    from fedge.plugins.data.base import ArrayDataset

__all__ = ["ExportConfig", "ExportWorkflow", "export_model"]

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


@dataclass(frozen=True, slots=True)
class ChosenExporter:
    """An exporter plugin by name, with its Config built from the user's options."""

    # TODO(#11): the core's Registry.choose returns this (Chosen[ExporterPlugin]) once it lands.
    name: str
    plugin: ExporterPlugin
    config: Any

    @property
    def quantization(self) -> Quantization | None:
        q = getattr(self.config, "quantization", None)
        return q if isinstance(q, Quantization) else None


def choose_exporter(cfg: ExportConfig) -> ChosenExporter:
    """The exporter ``cfg`` names, its options validated (``--quantize`` folded in).

    Raises:
        ConfigError: unknown exporter, an option its Config lacks or refuses.
    """
    registry = exporter_registry()
    try:
        plugin = registry.get(cfg.exporter)
    except PluginNotFoundError as err:
        raise ConfigError(f"{err} (--exporter; see: fedge plugins --kind exporter)") from err
    if not isinstance(plugin, ExporterPlugin):
        raise ConfigError(f"exporter {cfg.exporter!r} has no Config and export(source, config); fix the plugin")
    options = dict(cfg.options)
    if cfg.quantize is not None:
        if "quantization" not in getattr(plugin.Config, "__dataclass_fields__", {}):
            raise ConfigError(f"exporter {cfg.exporter!r} has no quantization option; leave out --quantize")
        options["quantization"] = cfg.quantize
    config = from_mapping(plugin.Config, options, where=f"exporter.{cfg.exporter}")
    return ChosenExporter(name=cfg.exporter, plugin=plugin, config=config)


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


def _interrupted(message: str) -> FedgeError:
    # TODO(#12): fedge.errors.Interrupted (exit 130) once it lands in the core.
    err = FedgeError(message)
    err.exit_code = 130
    return err


_MIN_FREE_BYTES = 4 * 2**20
_RUN_MARKERS = (".fedge-run", "config.toml", "metrics.jsonl", "model.pt", "edge-report.json", "ca.crt")


def _check_writable(out: Path) -> None:
    """One line, before any work, if ``out`` cannot take a run: a file, read-only, or on a full disk."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; pass a directory (new or empty)")
    parent = out if out.is_dir() else next(p for p in out.parents if p.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".fedge-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"--out {str(out)!r} cannot be written ({parent}: {err.strerror or err}); choose another --out"
        ) from err
    if shutil.disk_usage(parent).free < _MIN_FREE_BYTES:
        raise ConfigError(
            f"--out {str(out)!r}: the disk holding {parent} is full ({shutil.disk_usage(parent).free:,} B free, an "
            f"export needs about {_MIN_FREE_BYTES // 2**20} MiB); free some space or choose another --out"
        )


@contextlib.contextmanager
def _run_dir(out: str | Path | None, *, overwrite: bool) -> Iterator[RunDir]:
    """The run directory, refused up front if it cannot take a new run; replaced whole with ``overwrite``.

    A directory this made is removed again if the export fails before writing.
    TODO(#12): the core's ``RunDir.create("edge", out, overwrite=...)`` context manager does this once it lands.
    """
    out = Path(out) if out is not None else None
    _check_writable(out if out is not None else Path.cwd() / "runs")
    held = [m for m in _RUN_MARKERS if (out / m).exists()] if out is not None and out.is_dir() else []
    if held and not overwrite:
        raise ConfigError(
            f"--out {str(out)!r} already holds a run ({held[0]}); choose another --out, or pass --overwrite to "
            "replace it"
        )
    if out is None or not held:
        root_made = out is None and not Path("runs").exists()
        out_made = out is not None and not out.exists()
        run = RunDir.create("edge", out)
        try:
            yield run
        except BaseException:  # nothing of a failed export stays behind in a directory this made
            if out is None or out_made:
                shutil.rmtree(run.path, ignore_errors=True)
            if root_made:
                with contextlib.suppress(OSError):
                    Path("runs").rmdir()
            raise
        return
    # The new run is written beside the old one and swapped in only once it is complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield RunDir(staging)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
        quant = self.exporter.quantization
        if self.board is not None and quant is not None and not quant.runs_on_tflm:
            raise ConfigError(
                f"TFLite Micro on {self.board.name} cannot run {quant.value} models (no float16 or hybrid kernels); "
                "use --quantize int8 or none"
            )
        self._worker = worker

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
            run = stack.enter_context(_run_dir(self.out, overwrite=self.overwrite))
            if self._worker is None:  # starts importing its converter while the model and data load
                self._worker = stack.enter_context(ConversionWorker(kind))
            try:
                report, check, fit = self._export(run)
            except KeyboardInterrupt:
                raise _interrupted(f"interrupted during the export of {self.source_path}; no run was written") from None
        if check.problem is not None:
            raise type(check.problem)(f"{check.problem} (report in {report['run_dir']})") from check.problem
        if fit is not None and not fit.fits:
            raise ConfigError(f"{fit.message()} (report in {report['run_dir']})")
        return report

    def _export(self, run: RunDir) -> tuple[dict[str, Any], Verification, Fit | None]:
        src = load_source(self.source_path)
        dataset = self.load_dataset(src)
        source_out, shape = run_source(src, dataset.x_test, dataset=f"dataset {dataset.name!r}")
        x_train, x_test = to_layout(dataset.x_train, shape), to_layout(dataset.x_test, shape)
        accuracy_source = float((source_out.argmax(1) == dataset.y_test).mean())

        t0 = time.perf_counter()
        artefacts = self.convert(ExportSource(src.model, x_train, worker=self._worker))
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
        self.write(run, artefacts, report)
        return report, check, fit

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
            report["board"] = {"name": b.name, "flash_bytes": b.flash_bytes, "ram_bytes": b.ram_bytes, "notes": b.notes}
            report["fits"] = fit.fits
        return report

    def write(self, run: RunDir, artefacts: Artefacts, report: dict[str, Any]) -> None:
        """The artefacts, ``edge-report.json``, ``config.toml`` and ``metrics.jsonl`` into ``run``."""
        report["run_dir"] = str(Path(self.out) if self.out is not None else run.path)
        settings = {"model": str(self.source_path), **to_mapping(self.config)}
        run.write_config({k: v for k, v in settings.items() if v is not None and v != {}})
        for name, content in artefacts.files.items():
            run.write_bytes(name, content.encode("utf-8") if isinstance(content, str) else content)
        run.write_json("edge-report.json", report)
        run.append_metrics(
            {
                "stage": "export",
                "convert_s": report["convert_s"],
                "verify_s": report["verify_s"],
                "size_bytes": report["size_bytes"],
            }
        )


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
