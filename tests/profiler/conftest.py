"""Builders of tiny synthetic torch.profiler traces for the profiler's unit tests."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


class TraceBuilder:
    """Collects events for one rank and writes them as a Kineto-style trace file."""

    def __init__(self, rank: int | None = 0, **top: Any) -> None:
        self.rank = rank
        self.top = top
        self.events: list[dict[str, Any]] = []
        self.corr = 1000

    def step(self, n: int, ts: float, dur: float, *, gpu_copy: bool = False) -> TraceBuilder:
        self.events.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{n}", "pid": 1, "tid": 1,
                            "ts": ts, "dur": dur, "args": {}})
        if gpu_copy:
            self.events.append({"ph": "X", "cat": "gpu_user_annotation", "name": f"ProfilerStep#{n}", "pid": 0, "tid": 7,
                                "ts": ts + 1, "dur": dur, "args": {}})
        return self

    def cpu_op(self, name: str, ts: float, dur: float, *, tid: int = 1, cat: str = "cpu_op", **args: Any) -> TraceBuilder:
        self.events.append({"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args})
        return self

    def kernel(self, name: str, ts: float, dur: float, *, stream: int = 7, launch_ts: float | None = None,
               launch_dur: float = 2.0, cat: str = "kernel", tid: int = 1, **args: Any) -> TraceBuilder:
        """A GPU event, plus its cudaLaunchKernel (at ``launch_ts``, default 10 us before) with the same correlation."""
        self.corr += 1
        launch_ts = ts - 10 if launch_ts is None else launch_ts
        self.events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": tid,
                            "ts": launch_ts, "dur": launch_dur, "args": {"correlation": self.corr}})
        self.events.append({"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
                            "args": {"device": 0, "stream": stream, "correlation": self.corr, **args}})
        return self

    def noise(self, ts: float) -> TraceBuilder:
        """Events the loader must skip: python_function, flows, instants, metadata."""
        self.events += [
            {"ph": "X", "cat": "python_function", "name": "train.py(10): step", "pid": 1, "tid": 1, "ts": ts, "dur": 5},
            {"ph": "s", "cat": "ac2g", "id": 1, "pid": 1, "tid": 1, "ts": ts, "name": "ac2g"},
            {"ph": "i", "cat": "cpu_instant_event", "name": "[memory]", "pid": 1, "tid": 1, "ts": ts, "s": "t"},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "thread 1 (python)"}},
        ]
        return self

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schemaVersion": 1}
        if self.rank is not None:
            doc["distributedInfo"] = {"backend": "nccl", "rank": self.rank, "world_size": 2}
        doc.update(self.top)
        doc["traceEvents"] = self.events
        return doc

    def write(self, path: Path, *, indent: bool = True) -> Path:
        text = json.dumps(self.document(), indent=1 if indent else None)
        if path.name.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
        return path


@pytest.fixture
def builder() -> type[TraceBuilder]:
    return TraceBuilder


@pytest.fixture(scope="session")
def shared_job(shared_traces: Path) -> Callable[[str], Any]:
    """``shared_job(name)``: the shared trace set ``name``, loaded once for the whole session (several test
    modules read the same multi-MB sets; analyses never change a job)."""
    from fedge.profiler import load_job

    jobs: dict[str, Any] = {}

    def load(name: str) -> Any:
        if name not in jobs:
            jobs[name] = load_job(shared_traces / name, max_workers=1)
        return jobs[name]

    return load
