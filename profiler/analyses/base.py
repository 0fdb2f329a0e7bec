"""What every analysis shares: the plugin protocol, its base config, the job view it reads (a job under one
set of definitions, with the derived data several analyses use computed once), and the result contract the
report renders: ``to_json()`` for ``--json``, ``sections()`` (a title, columns and rows, an optional figure)
for the terminal and HTML.

A new analysis is one module with a class tagged ``@plugin("analysis", NAME)`` that nests a ``Config``
(extending :class:`AnalysisConfig`) and has ``run(view, config)`` returning a :class:`Result`, plus one entry
point in ``fedge.analyses``; examples/custom_plugin's ``launch_delay.py`` is a complete one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np

from fedge.profiler.columns import release_free_memory
from fedge.profiler.kinds import Mode
from fedge.profiler.timeline import Kernels, cpu_intervals, kernels
from fedge.profiler.trace import Job, Trace

__all__ = ["AnalysisConfig", "AnalysisPlugin", "Column", "JobView", "Result", "Section", "as_view", "jsonable"]

R = TypeVar("R")


@dataclass(frozen=True, kw_only=True, slots=True)
class AnalysisConfig:
    """Options every analysis takes (the report passes them to every Config that declares them)."""

    mode: Mode = Mode.FEDGE
    """Definitions to use: ``fedge`` (recognises non-NCCL collectives, exact timestamps), ``hta``
    (reproduces Holistic Trace Analysis 0.5.0) or ``tb-profiler`` (reproduces torch-tb-profiler 0.4.3's
    distributed view)."""

    include_last_step: bool = False
    """Keep the kernels of the last ProfilerStep (HTA drops it: it is usually cut short)."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise ValueError(f"mode must be one of {', '.join(m.value for m in Mode)}, got {self.mode!r}") from None


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, NaN/inf to None, tuples to lists, dataclasses to dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 3)
    return value


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: the row key, its header, and ``ms`` for a µs value shown in milliseconds."""

    key: str
    header: str
    unit: str = ""


@dataclass(frozen=True, slots=True)
class Section:
    """One block of the report as an analysis shows it: a title, a table (columns and rows), an optional
    inline SVG figure (HTML only) and lines of text."""

    title: str
    columns: tuple[Column, ...] = ()
    rows: tuple[dict[str, Any], ...] = ()
    figure: str = ""
    lines: tuple[str, ...] = ()


class Result:
    """Base of analysis results (frozen dataclasses). Every method has a default, so a plain result renders.

    - ``to_json()``: the result under ``analyses.<name>`` in the report (all fields).
    - ``to_rows()``: the rows of its main table (a ``rows`` field by default).
    - ``sections()``: what the terminal and HTML show (default: one table of ``to_rows()``).
    - ``report_fields()`` / ``rank_fields()``: keys the result puts at the top of the report, and per rank
      into ``ranks`` (the stable JSON contract); a result that gives neither goes under ``analyses``.
    - ``notes()``: lines for the report's notes.
    """

    def to_json(self) -> dict[str, Any]:
        out = jsonable(self)
        assert isinstance(out, dict)
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        rows = getattr(self, "rows", ())
        return [jsonable(r) for r in rows]

    def sections(self) -> list[Section]:
        rows = self.to_rows()
        keys = list(rows[0]) if rows else []
        title = (type(self).__doc__ or type(self).__name__).strip().splitlines()[0].rstrip(".")
        return [Section(title, tuple(Column(k, k) for k in keys), tuple(rows))]

    def report_fields(self) -> dict[str, Any]:
        return {}

    def rank_fields(self) -> dict[int, dict[str, Any]]:
        return {}

    def notes(self) -> list[str]:
        return []


class JobView:
    """A job read under one set of definitions (``mode``, ``include_last_step``), with what analyses derive
    from each rank (classified kernels, CPU intervals, collective ops) computed on first use and shared by
    every analysis that reads this view. The traces themselves are never changed.

    Example::

        view = JobView(load_job("traces/"), mode=Mode.HTA)
        temporal_breakdown(view), comm_comp_overlap(view)  # kernels classified once
    """

    def __init__(
        self, job: Job, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False, baseline: JobView | None = None
    ) -> None:
        self.job = job
        self.mode = Mode(mode)
        self.include_last_step = include_last_step
        self.baseline = baseline
        """The run this one is compared with, for analyses of two traces (``fedge profile diff``)."""
        self._derived: dict[tuple[str, int], Any] = {}

    @property
    def traces(self) -> tuple[Trace, ...]:
        return self.job.traces

    def derive(self, what: str, trace: Trace, compute: Callable[[], R]) -> R:
        """``compute()`` for ``trace``, once per view (``what`` names the derived data)."""
        key = (what, id(trace))
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]  # type: ignore[no-any-return]

    def once(self, what: str, compute: Callable[[], R]) -> R:
        """``compute()`` once per view: a result several analyses read (the recommendations read the temporal,
        overlap and idle breakdowns the report has just computed)."""
        key = (what, 0)
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]  # type: ignore[no-any-return]

    def kernels(self, trace: Trace) -> Kernels:
        """The GPU events the analyses use (see :func:`fedge.profiler.timeline.kernels`)."""
        return self.derive("kernels", trace, lambda: _trimmed(kernels(trace, self.mode, include_last_step=self.include_last_step)))

    def cpu_intervals(self, trace: Trace) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """CPU compute and collective intervals, for ranks with no GPU activity."""
        return self.derive("cpu", trace, lambda: cpu_intervals(trace, include_last_step=self.include_last_step, mode=self.mode))


def _trimmed(value: R) -> R:
    release_free_memory()  # the temporaries of a multi-GB rank's kernels, before the analyses add their own
    return value


def as_view(data: Job | Trace | JobView, *, mode: Mode | str = Mode.FEDGE, include_last_step: bool = False) -> JobView:
    """Analyses accept one trace, a job, or a view; a view read under other definitions is re-read."""
    if isinstance(data, JobView):
        if data.mode is Mode(mode) and data.include_last_step == include_last_step:
            return data
        data = data.job
    job = data if isinstance(data, Job) else Job(traces=(data,))
    return JobView(job, mode=mode, include_last_step=include_last_step)


@runtime_checkable
class AnalysisPlugin(Protocol):
    """An analysis: a ``Config`` dataclass (extending :class:`AnalysisConfig` to receive the mode) and
    ``run(view, config)`` returning a :class:`Result`. Optional: ``order`` (int, default 50) places its
    sections in the report; ``inputs = 2`` makes it an analysis of two runs, run by ``fedge profile diff``
    with ``view.baseline`` set (default 1: ``fedge profile report``); ``modes`` (a tuple of :class:`Mode`) runs it
    only under those definitions (default: every mode). The class docstring's first line is its summary in
    ``fedge plugins``."""

    Config: ClassVar[type]

    def run(self, view: JobView, config: Any) -> Result: ...
