"""``fedge edge fit``: when a trained model's int8 export does not fit a board, search a small seeded space of
smaller models (truncated-SVD low-rank factorizations with a short fine-tune, and students of the same model
family distilled from it), export each to int8, verify it on LiteRT and TFLite Micro like any export, and keep
the most accurate one that fits.

Example::

    report = fit_model("runs/fl-20260101-120000", FitConfig(target="xiao-samd21"))
    report["chosen"], [(c["name"], c["size_bytes"], c["accuracy"]) for c in report["candidates"]]
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.config import to_mapping
from fedge.edge.boards import Board
from fedge.edge.convert import ConversionWorker, Quantization
from fedge.edge.export_workflow import ExportConfig, Exported, ExportWorkflow, run_dir, write_artefacts
from fedge.edge.source import SourceModel, load_source, source_kind
from fedge.errors import ConfigError, FedgeError, Interrupted
from fedge.rundir import RunDir

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedge.plugins.data.base import ArrayDataset

__all__ = ["Candidate", "FitConfig", "FitSearch", "FitWorkflow", "Trial", "fit_model"]

AS_IS = "as-is"


def _fractions(name: str, values: tuple[float, ...]) -> None:
    bad = [v for v in values if not 0.0 < v < 1.0]
    if bad:
        raise ValueError(f"{name} must be fractions between 0 and 1 (e.g. 0.5,0.25), got {bad[0]}")


@dataclass(frozen=True, kw_only=True, slots=True)
class FitConfig:
    """Settings of ``fedge edge fit`` (flags, or keys of a TOML file)."""

    target: str
    """Board the model must fit (see ``fedge edge boards``)."""
    dataset: str | None = None
    """Dataset plugin for training, calibration and held-out checks when model.json names none (then digits)."""
    ranks: tuple[float, ...] = (0.5, 0.25, 0.125)
    """Low-rank candidates: the share of each layer's rank kept by truncated SVD (empty: none)."""
    widths: tuple[float, ...] = (0.5, 0.25, 0.125)
    """Distilled students: the share of the teacher's channels and hidden units they get (empty: none)."""
    epochs: int = 8
    """Distillation epochs of each student."""
    finetune_epochs: int = 2
    """Fine-tune epochs of each factorized model (on the teacher's soft labels, as a student)."""
    temperature: float = 4.0
    """Softens teacher and student outputs before they are compared."""
    alpha: float = 0.7
    """Weight of the teacher's soft labels in the loss; the true labels get 1 - alpha."""
    seed: int = 0
    """Seed of the students' initial weights and of the sample order: the same seed gives the same search."""
    symbol: str = "g_model"
    """C name of the chosen model's array in model_data.cc."""

    def __post_init__(self) -> None:
        _fractions("ranks", self.ranks)
        _fractions("widths", self.widths)
        if not self.ranks and not self.widths:
            raise ValueError("ranks and widths are both empty: there is nothing to search; give at least one")
        if self.epochs < 1 or self.finetune_epochs < 0:
            raise ValueError(f"epochs must be >= 1 and finetune_epochs >= 0, got {self.epochs}, {self.finetune_epochs}")
        # DistillConfig checks the same two; it is not built here because its module imports torch (~2 s).
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")

    def export_config(self) -> ExportConfig:
        """How every candidate is exported: int8 with the C array, checked against the board."""
        return ExportConfig(
            exporter="c-array",
            options={"symbol": self.symbol},
            quantize=Quantization.INT8,
            dataset=self.dataset,
            target=self.target,
        )


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model the search tries: how it is made from the teacher, and the setting that makes it smaller."""

    name: str
    method: str
    """``as-is`` (the teacher itself), ``low-rank`` or ``distill``."""
    setting: dict[str, Any]
    make: Callable[[], nn.Module]
    """Build the (untrained) candidate: cheap, so its weights can be counted before it is trained."""
    train: Callable[[nn.Module], None]
    """Train it in place (nothing for the teacher)."""


@dataclass(slots=True)
class Trial:
    """What trying one candidate gave: its export, or why it was skipped or failed."""

    candidate: Candidate
    model: nn.Module | None = None
    params: int = 0
    train_s: float = 0.0
    exported: Exported | None = None
    skipped: str | None = None
    """Why it was not exported (its weights alone exceed the flash), or the error its export raised."""

    @property
    def size_bytes(self) -> int:
        return self.exported.report["size_bytes"] if self.exported is not None else 0

    @property
    def accuracy(self) -> float:
        return self.exported.report["accuracy_exported"] if self.exported is not None else 0.0

    @property
    def eligible(self) -> bool:
        """Exported, verified without a problem, and fits the board."""
        e = self.exported
        return e is not None and e.check.problem is None and e.fit is not None and e.fit.fits

    def to_json(self, baseline: float | None) -> dict[str, Any]:
        c = self.candidate
        row: dict[str, Any] = {"name": c.name, "method": c.method}
        row.update(setting=c.setting, params=self.params, train_s=round(self.train_s, 3))
        if self.exported is None:
            return {**row, "exported": False, "fits": False, "reason": self.skipped}
        r, check, fit = self.exported.report, self.exported.check, self.exported.fit
        tflm = r["runtimes"].get("tflm", {})
        row.update(
            exported=True,
            size_bytes=r["size_bytes"],
            arena_bytes=r["arena_bytes"],
            accuracy_float=r["accuracy_source"],
            accuracy=r["accuracy_exported"],
            accuracy_tflm=tflm.get("accuracy"),
            runtimes_agreed=r["runtimes"]["agreed"],
            flash_ok=bool(fit and fit.flash_ok),
            ram_ok=bool(fit and fit.ram_ok),
            fits=self.eligible,
            convert_s=r["convert_s"],
            verify_s=r["verify_s"],
        )
        if baseline is not None:
            row["accuracy_drop_points"] = round(100 * (baseline - r["accuracy_exported"]), 3)
        if check.problem is not None:
            row["reason"] = str(check.problem)
        return row


class FitSearch:
    """The candidates for one teacher: the teacher as it is, then low-rank factorizations and distilled students,
    each seeded; the teacher's soft labels are computed once, when the first candidate trains.

    Args:
        src: the teacher (a fedge torch model with its model.json spec).
        dataset: its dataset (students train on ``x_train``; accuracy is measured on the held-out ``x_test``).
        config: the search space and training settings.
    """

    def __init__(self, src: SourceModel, dataset: ArrayDataset, config: FitConfig) -> None:
        self.src = src
        self.teacher: nn.Module = src.model  # type: ignore[assignment]  # a torch model: FitWorkflow checked
        self.dataset = dataset
        self.config = config
        self._soft: torch.Tensor | None = None

    def candidates(self) -> Iterator[Candidate]:
        """The teacher first, then the low-rank candidates (largest rank first), then the students (widest first)."""
        yield Candidate(AS_IS, AS_IS, {}, make=lambda: self.teacher, train=lambda model: None)
        for fraction in sorted(self.config.ranks, reverse=True):
            yield self._low_rank(fraction)
        for width in sorted(self.config.widths, reverse=True):
            student = self._student(width)
            if student is not None:
                yield student

    def soft_labels(self) -> torch.Tensor:
        from fedge.edge.distill import teacher_logits

        if self._soft is None:
            self._soft = teacher_logits(self.teacher, self.dataset.x_train)
        return self._soft

    def _trainer(self, epochs: int, *, lr: float) -> Callable[[nn.Module], None]:
        from fedge.edge.distill import DistillConfig, distill

        cfg = self.config
        settings = DistillConfig(epochs=epochs, temperature=cfg.temperature, alpha=cfg.alpha, lr=lr, seed=cfg.seed)

        def train(model: nn.Module) -> None:
            if epochs:
                distill(model, self.soft_labels(), self.dataset.x_train, self.dataset.y_train, settings)

        return train

    def _low_rank(self, fraction: float) -> Candidate:
        from fedge.edge.low_rank import factorize

        def make() -> nn.Module:
            model, ranks = factorize(self.teacher, fraction)
            setting["ranks"] = ranks
            return model

        setting: dict[str, Any] = {"rank_fraction": fraction}
        # A factorized model starts close to the teacher: a short fine-tune at a small learning rate.
        train = self._trainer(self.config.finetune_epochs, lr=0.01)
        return Candidate(f"low-rank-{fraction:g}", "low-rank", setting, make=make, train=train)

    def _student(self, width: float) -> Candidate | None:
        from fedge.edge.distill import student_options
        from fedge.plugins.models import build_model

        spec = self.src.spec
        options = student_options(spec.get("config", {}), width)
        if options is None:
            return None
        options["seed"] = self.config.seed
        setting = {"width": width, "config": {k: v for k, v in options.items() if k != "seed"}}

        def make() -> nn.Module:
            return build_model(
                spec["model"], options, input_shape=tuple(spec["input_shape"]), num_classes=int(spec["num_classes"])
            )

        train = self._trainer(self.config.epochs, lr=0.05)
        return Candidate(f"distill-{width:g}", "distill", setting, make=make, train=train)


def _choose(trials: list[Trial]) -> Trial | None:
    """The most accurate candidate that fits; a tie goes to the smaller file, then to the earlier candidate."""
    fitting = [t for t in trials if t.eligible]
    if not fitting:
        return None
    return max(fitting, key=lambda t: (t.accuracy, -t.size_bytes))


def nothing_fits(board: Board, trials: list[Trial], run_path: str) -> str:
    """The one line for a board no candidate fits: the smallest model reached, against what the board leaves."""
    exported = [(t, t.exported.report) for t in trials if t.exported is not None]
    flash, ram = f"{board.model_flash_bytes:,} B of flash", f"{board.arena_ram_bytes:,} B of RAM"
    if not exported:
        return f"nothing fits {board.name}: no candidate could be exported (report in {run_path})"
    smallest, r = min(exported, key=lambda tr: (tr[1]["size_bytes"], tr[1]["arena_bytes"] or 0))
    arena = f"{r['arena_bytes']:,} B" if r["arena_bytes"] is not None else "an unknown"
    too_big = sum(t.exported is None and t.params > board.model_flash_bytes for t in trials)
    also = f"; {too_big} smaller candidate(s) have more weights than that flash" if too_big else ""
    return (
        f"nothing fits {board.name}: the smallest model reached ({smallest.candidate.name}) needs "
        f"{r['size_bytes']:,} B of flash and a {arena} tensor arena, the board leaves {flash} and {ram}{also}; "
        f"use a larger board, or smaller --widths/--ranks (report in {run_path})"
    )


class FitWorkflow:
    """``fedge edge fit`` as named steps: check the settings, start the converter, export the teacher, search,
    choose, write.

    Args:
        source: the trained model (a fedge run directory, or a .pt beside model.json).
        config: the command's settings.
        out: the run directory (None: ``runs/edge-fit-<timestamp>``).
        boards: extra boards (a TOML path or a mapping of ``[boards.NAME]`` tables).
        overwrite: replace a run already in ``out`` (whole, once the new one is written).
        progress: called with a line before each candidate (the CLI shows it).
    """

    def __init__(
        self,
        source: str | Path,
        config: FitConfig,
        *,
        out: str | Path | None = None,
        boards: str | Path | Mapping[str, Any] | None = None,
        overwrite: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.source_path = Path(source)
        self.config = config
        self.out = out
        self.overwrite = overwrite
        self.progress = progress or (lambda line: None)
        self.exporter = ExportWorkflow(source, config.export_config(), boards=boards)
        assert self.exporter.board is not None  # target is a required setting
        self.board: Board = self.exporter.board

    def run(self) -> dict[str, Any]:
        """Search and write; returns ``fit-report.json`` (with ``run_dir``).

        Raises:
            DataError: missing or corrupt model.
            ConfigError: not a fedge torch model, a bad run directory, or nothing fits (the report is written).
        """
        if source_kind(self.source_path) != "torch":
            raise ConfigError(
                f"fedge edge fit rebuilds the model from its plugin: it needs a fedge run directory (model.pt + "
                f"model.json) or a .pt beside model.json, not {str(self.source_path)!r}"
            )
        with contextlib.ExitStack() as stack:
            run = stack.enter_context(run_dir(self.out, overwrite=self.overwrite, kind="edge-fit"))
            # Started first: it imports litert-torch while the teacher and the data load.
            self.exporter.worker = stack.enter_context(ConversionWorker("torch", num_threads=1))
            try:
                report, chosen = self._search(run)
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted during fedge edge fit of {self.source_path}; no run was written"
                ) from None
        if chosen is None:
            raise ConfigError(report["nothing_fits"])
        return report

    def _search(self, run: RunDir) -> tuple[dict[str, Any], Trial | None]:
        src = load_source(self.source_path)
        dataset = self.exporter.load_dataset(src)
        search = FitSearch(src, dataset, self.config)
        trials: list[Trial] = []
        for candidate in search.candidates():
            if trials and trials[0].eligible:
                break  # the teacher fits as it is: nothing to search
            self.progress(f"{candidate.name}: train, export int8, run on LiteRT and TFLM")
            trials.append(self.attempt(candidate, src, dataset))
        chosen = _choose(trials)
        report = self.report(trials, chosen, run)
        self.write(run, src, chosen, report)
        return report, chosen

    def attempt(self, candidate: Candidate, src: SourceModel, dataset: ArrayDataset) -> Trial:
        """Build, train, export and verify one candidate (skipped when its weights alone exceed the flash)."""
        from fedge.edge.low_rank import num_params

        try:
            model = candidate.make()
        except ValueError as err:  # a student Config its plugin refuses (e.g. heads that no longer divide)
            return Trial(candidate, skipped=f"cannot build it: {err}")
        trial = Trial(candidate, model, params=num_params(model))
        flash = self.board.model_flash_bytes
        if candidate.method != AS_IS and self.board.flash_kb and trial.params > flash:
            trial.skipped = f"{trial.params:,} int8 weights > {flash:,} B of flash left"
            return trial
        t0 = time.perf_counter()
        candidate.train(model)
        trial.train_s = time.perf_counter() - t0
        shrunk = replace(src, model=model, description=f"{src.description} -> {candidate.name}")
        try:
            trial.exported = self.exporter.export_source(shrunk, dataset)
        except FedgeError as err:  # one candidate's converter failure is that candidate's result
            trial.skipped = str(err)
        return trial

    def report(self, trials: list[Trial], chosen: Trial | None, run: RunDir) -> dict[str, Any]:
        """``fit-report.json``: the board, the teacher's int8 baseline, every candidate, the choice."""
        teacher = trials[0].exported
        baseline = teacher.report["accuracy_exported"] if teacher is not None else None
        b = self.board
        run_path = str(Path(self.out) if self.out is not None else run.path)
        report: dict[str, Any] = {
            "source": str(self.source_path),
            "board": {"name": b.name, "model_flash_bytes": b.model_flash_bytes, "arena_ram_bytes": b.arena_ram_bytes},
            "teacher_accuracy_int8": baseline,
            "fits_as_is": trials[0].eligible,
            "selection": "highest int8 accuracy on the held-out samples (LiteRT) among candidates that fit",
            "candidates": [t.to_json(baseline) for t in trials],
            "chosen": chosen.candidate.name if chosen is not None else None,
            "run_dir": run_path,
        }
        if chosen is None:
            report["nothing_fits"] = nothing_fits(b, trials, run_path)
        return report

    def write(self, run: RunDir, src: SourceModel, chosen: Trial | None, report: dict[str, Any]) -> None:
        """The chosen model's artefacts and ``edge-report.json`` as an export writes them, ``fit-report.json``,
        ``config.toml``, one ``metrics.jsonl`` line per candidate; the student's ``model.pt`` + ``model.json``."""
        run.write_config({"model": str(self.source_path), **to_mapping(self.config)})
        if chosen is not None and chosen.exported is not None:
            edge_report = {**chosen.exported.report, "fit_candidate": chosen.candidate.name, "run_dir": report["run_dir"]}
            write_artefacts(run, chosen.exported.artefacts, edge_report)
            if chosen.candidate.method == "distill":
                self._save_student(run, chosen, src)
        run.write_json("fit-report.json", report)
        for row in report["candidates"]:
            run.append_metrics({"stage": "fit", **{k: v for k, v in row.items() if k not in ("setting", "reason")}})

    def _save_student(self, run: RunDir, chosen: Trial, src: SourceModel) -> None:
        # A student is a plugin model, so its directory is a MODEL for fedge edge export as any trained run is.
        from fedge.plugins.models import save_model

        assert chosen.model is not None
        keep: dict[str, Any] = {k: src.spec[k] for k in ("dataset", "dataset_options") if k in src.spec}
        save_model(chosen.model, run.path, extra={**keep, "distilled_from": str(self.source_path)})


def fit_model(
    source: str | Path,
    config: FitConfig,
    *,
    out: str | Path | None = None,
    boards: str | Path | Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``fedge edge fit`` as a function: see :class:`FitWorkflow`."""
    return FitWorkflow(source, config, out=out, boards=boards, overwrite=overwrite).run()
