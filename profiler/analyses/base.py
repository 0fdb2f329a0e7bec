"""What every analysis shares: its base config (mode), the result base class, and the helpers that turn a
trace or a job into the ranks to analyse."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.profiler.kinds import Mode
from fedge.profiler.trace import Job, Trace

__all__ = ["AnalysisConfig", "Result", "as_job", "jsonable"]


@dataclass(frozen=True, kw_only=True, slots=True)
class AnalysisConfig:
    """Options every analysis takes."""

    mode: str = "fedge"
    """Definitions to use: ``fedge`` (recognises non-NCCL collectives, exact timestamps) or ``hta``
    (reproduces Holistic Trace Analysis 0.5.0)."""

    include_last_step: bool = False
    """Keep the kernels of the last ProfilerStep (HTA drops it: it is usually cut short)."""

    def __post_init__(self) -> None:
        if self.mode not in {m.value for m in Mode}:
            raise ValueError(f"mode must be one of {', '.join(m.value for m in Mode)}, got {self.mode!r}")


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


class Result:
    """Base of analysis results (frozen dataclasses): ``to_json()`` for the report, ``to_rows()`` for tables.

    A result with a ``rows`` field returns those rows; others override ``to_rows``.
    """

    def to_json(self) -> dict[str, Any]:
        out = jsonable(self)
        assert isinstance(out, dict)
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        rows = getattr(self, "rows", ())
        return [jsonable(r) for r in rows]


def as_job(data: Job | Trace) -> Job:
    """Analyses accept one trace or a whole job."""
    return data if isinstance(data, Job) else Job(traces=(data,))
