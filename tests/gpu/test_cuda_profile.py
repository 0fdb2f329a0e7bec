"""``fedge train --profile`` on CUDA writes Kineto traces with real GPU work, and ``fedge profile report``
reads them in both modes: world 1 on NCCL, world 2 with gloo carrying CUDA tensors on one GPU (gloo's CUDA
all_reduce copies each bucket to the host and back on its own stream, so the transfers of communication
show as memcpy there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from fedge.profiler import load_job

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc]

LAYOUTS = {
    "nccl-1": ["--nproc", "1"],
    "gloo-cuda-2": ["--nproc", "2", "--device", "cuda", "--backend", "gloo"],
}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, fedge_cli) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cuda-profile")
    settings = tmp / "job.toml"
    settings.write_text(tomli_w.dumps({"model": "cnn", "dataset": "digits", "batch_size": 64, "steps": 8}))
    dirs = {}
    for name, flags in LAYOUTS.items():
        out = tmp / name
        proc = fedge_cli("train", settings, "--strategy", "allreduce", *flags, "--profile", "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        dirs[name] = out / "traces"
    return dirs


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cuda_trace_holds_kernels_and_memcpy_on_streams(traced: dict[str, Path], layout: str) -> None:
    # Execute
    job = load_job(traced[layout], max_workers=1)
    # Assert
    assert job.ranks == list(range(len(job.ranks))) and not job.errors
    for trace in job.traces:
        names = [trace.names[i] for i in trace.gpu.name]
        assert trace.has_gpu, trace.path
        assert any("Memcpy" in n for n in names)  # the batch and the loss travel between host and GPU
        assert sum("Memcpy" not in n and "Memset" not in n for n in names) > 10  # conv/gemm/optimizer kernels
        assert len(set(trace.gpu.tid.tolist())) >= 1
    if layout == "gloo-cuda-2":  # gloo's staging copies run on a stream of their own
        assert all(len(set(t.gpu.tid.tolist())) >= 2 for t in job.traces)


@pytest.mark.parametrize("mode", ["fedge", "hta"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_profile_report_breaks_down_the_cuda_trace(traced: dict[str, Path], fedge_cli, layout: str, mode: str) -> None:
    proc = fedge_cli("profile", "report", traced[layout], "--mode", mode, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == mode and report["gpu_activity"]
    for row in report["ranks"]:
        assert row["device"] != "cpu" and row["span_us"] > 0 and row["compute_us"] > 0
        assert row["idle_us"] + row["compute_us"] + row["non_compute_us"] == pytest.approx(row["span_us"], rel=1e-3)
    if layout == "gloo-cuda-2":
        assert {c["collective"] for c in report["collectives"]} >= {"all_reduce"}
