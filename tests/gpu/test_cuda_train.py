"""Every strategy's training steps on CUDA through the real ``fedge train`` (torchrun, the worker loop),
checked against single-process SGD on the CPU.

- World size 1: NCCL, the backend ``auto`` picks when every local rank has a GPU.
- World size 2 and 3 on one GPU: gloo carrying CUDA tensors (``--device cuda --backend gloo``), because
  NCCL refuses two ranks on one device. gloo's all_reduce takes CUDA tensors; its send/recv read host
  memory only, so ring, tree and the parameter server stage their messages through pinned host buffers,
  and a pipeline of several stages is refused in one line.

Parity: TF32 off (see conftest), so after 6 steps every parameter is within rtol 1e-4 / atol 1e-5 of the
CPU reference (float32 on both; CUDA's kernels sum in another order than the CPU's).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc]

STEPS = 6
RTOL, ATOL = 1e-4, 1e-5
MLP = {"model": "mlp", "model_options": {"hidden": [32, 16]}}
GPT = {"model": "tiny-gpt", "model_options": {"d_model": 32, "num_heads": 4, "num_layers": 2}}
JOB = {"dataset": "digits", "batch_size": 24, "seed": 3, "steps": STEPS}

# name -> (model settings, fedge train flags, the backend summary.json must report)
CASES: dict[str, tuple[dict[str, Any], list[str], str]] = {
    "allreduce-nccl-1": (MLP, ["--strategy", "allreduce", "--nproc", "1"], "nccl"),
    "ring-nccl-1": (MLP, ["--strategy", "ring-allreduce", "--nproc", "1"], "nccl"),
    "tree-nccl-1": (MLP, ["--strategy", "tree-allreduce", "--nproc", "1"], "nccl"),
    "pipeline-nccl-1": (MLP, ["--strategy", "pipeline", "--nproc", "1", "-o", "stages=1"], "nccl"),
    "megatron-nccl-1": (GPT, ["--strategy", "megatron", "--nproc", "1", "-o", "tp=1"], "nccl"),
    "allreduce-gloo-2": (MLP, ["--strategy", "allreduce", "--nproc", "2", "--device", "cuda", "--backend", "gloo", "-o", "bucket_mb=0.002", "-o", "first_bucket_mb=0.001"], "gloo"),
    "ring-gloo-2": (MLP, ["--strategy", "ring-allreduce", "--nproc", "2", "--device", "cuda", "--backend", "gloo", "-o", "chunk_bytes=256"], "gloo"),
    "tree-gloo-2": (MLP, ["--strategy", "tree-allreduce", "--nproc", "2", "--device", "cuda", "--backend", "gloo", "-o", "chunk_bytes=512"], "gloo"),
    "ps-gloo-3": (MLP, ["--strategy", "parameter-server", "--nproc", "3", "--device", "cuda", "--backend", "gloo"], "gloo"),
    "megatron-gloo-2": (GPT, ["--strategy", "megatron", "--nproc", "2", "--device", "cuda", "--backend", "gloo", "-o", "tp=2"], "gloo"),
}
# The single-process CPU runs each CUDA case is compared with (one per model).
REFERENCE = {"mlp": "allreduce-cpu-1", "tiny-gpt": "gpt-cpu-1"}
CPU_RUNS = {
    "allreduce-cpu-1": (MLP, ["--strategy", "allreduce", "--nproc", "1", "--device", "cpu", "--backend", "gloo"]),
    "gpt-cpu-1": (GPT, ["--strategy", "allreduce", "--nproc", "1", "--device", "cpu", "--backend", "gloo"]),
}


class Runs:
    """Runs ``fedge train`` once per named case, on demand, so ``-k`` selects only what it needs."""

    def __init__(self, tmp: Path, fedge_cli) -> None:
        self.tmp, self.fedge_cli = tmp, fedge_cli
        self.done: dict[str, tuple[Path, subprocess.CompletedProcess[str]]] = {}

    def get(self, name: str, model: dict[str, Any], flags: list[str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
        if name not in self.done:
            settings = self.tmp / f"{name}.toml"
            settings.write_text(tomli_w.dumps({**JOB, **model}), encoding="utf-8")
            out = self.tmp / name
            self.done[name] = out, self.fedge_cli("train", settings, *flags, "--out", out, "--json")
        return self.done[name]

    def ok(self, name: str) -> Path:
        model, flags, *_ = {**CASES, **CPU_RUNS}[name]
        out, proc = self.get(name, model, flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, fedge_cli) -> Runs:
    return Runs(tmp_path_factory.mktemp("cuda-train"), fedge_cli)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_trains_on_cuda_like_single_process_cpu(runs: Runs, case: str) -> None:
    # Prepare / Execute
    model, _, backend = CASES[case]
    out = runs.ok(case)
    ref = runs.ok(REFERENCE[model["model"]])
    # Assert
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == backend and summary["device"] == "cuda", summary
    assert summary["cuda_max_memory_allocated_bytes"] > 0
    state = torch.load(out / "model.pt", weights_only=True)
    ref_state = torch.load(ref / "model.pt", weights_only=True)
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert state[key].device.type == "cpu"  # model.pt loads anywhere
        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL, msg=key)
    assert _losses(out) == pytest.approx(_losses(ref), rel=RTOL)


def test_pipeline_stages_over_gloo_on_cuda_are_refused_in_one_line(runs: Runs) -> None:
    # gloo's send/recv cannot carry the activations of CUDA stages; saying so beats a crash in the transport.
    _, proc = runs.get("pipeline-gloo-2", MLP, ["--strategy", "pipeline", "--nproc", "2", "--device", "cuda", "--backend", "gloo"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "gloo does on CPU tensors only" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bfloat16_parameters_train_on_cuda(runs: Runs) -> None:
    # fedge has no autocast option; bf16 is the model's parameter dtype (model option dtype=bfloat16).
    bf16 = {"model": "mlp", "model_options": {"hidden": [32, 16], "dtype": "bfloat16"}}
    out, proc = runs.get("bf16-nccl-1", bf16, ["--strategy", "allreduce", "--nproc", "1", "--steps", "40"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    losses = _losses(out)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
