"""The CUDA branches that a CPU can check: which device and backend a rank gets, host staging of
point-to-point messages over gloo, the one-line refusals, and where a federated client trains."""

from __future__ import annotations

import pytest
import torch

from fedge.config import from_mapping
from fedge.errors import ConfigError
from fedge.plugins.strategies._host_staging import HostStage, needs_host_staging
from fedge.plugins.train.base import DistContext
from fedge.plugins.train.config import TrainConfig
from fedge.plugins.train.trainer import _backend, device_for

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")


@pytest.mark.parametrize(
    ("choice", "backend", "expected"),
    [("auto", "gloo", "cpu"), ("cpu", "gloo", "cpu"), ("cpu", "nccl", "cpu")],
)
def test_auto_device_is_the_cpu_unless_nccl(choice: str, backend: str, expected: str) -> None:
    assert device_for(backend, 0, choice).type == expected


def test_auto_backend_is_gloo_for_cpu_tensors_even_with_gpus() -> None:
    assert _backend("auto", 1, "cpu") == "gloo"
    assert _backend("nccl", 1, "cuda") == "nccl"
    assert _backend("auto", 10**6, "cuda") == "gloo"  # more ranks than GPUs: NCCL would put two on one device


@no_cuda
@pytest.mark.parametrize(("choice", "backend"), [("cuda", "gloo"), ("auto", "nccl")])
def test_cuda_without_a_gpu_is_one_line(choice: str, backend: str) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU, but torch .* sees none; use --device cpu"):
        device_for(backend, 1, choice)


def test_nccl_on_the_cpu_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="backend nccl works on CUDA tensors only; use --device cuda"):
        from_mapping(TrainConfig, {"backend": "nccl", "device": "cpu"})


@pytest.mark.parametrize(
    ("backend", "device", "staged"),
    [("gloo", "cuda", True), ("gloo", "cpu", False), ("nccl", "cuda", False)],
)
def test_only_gloo_with_device_tensors_is_staged(backend: str, device: str, staged: bool) -> None:
    assert needs_host_staging(backend, torch.device(device)) is staged


def test_host_stage_round_trip_reuses_its_buffer() -> None:
    # Prepare
    stage, t = HostStage(), torch.arange(6, dtype=torch.float32)
    # Execute
    host = stage.out(t)
    host.mul_(2)  # what a recv would do
    stage.back(t)
    # Assert
    assert torch.equal(t, torch.arange(6, dtype=torch.float32) * 2)
    assert stage.out(t).data_ptr() == host.data_ptr()  # kept across steps
    assert stage.mirror(torch.zeros(3)).shape == (3,)  # another shape: a new buffer


def test_pipeline_stages_over_gloo_on_cuda_are_refused_before_any_message() -> None:
    # Prepare: two stages whose tensors would live on a GPU, over gloo (no GPU needed to get the refusal).
    from fedge.plugins.strategies.pipeline import Pipeline

    ctx = DistContext(rank=0, world_size=2, local_rank=0, backend="gloo", device=torch.device("cuda", 0))
    strategy = Pipeline(Pipeline.Config(stages=2), ctx)
    # Execute / Assert
    with pytest.raises(ConfigError, match="gloo does on CPU tensors only, not on cuda; give each stage its own GPU"):
        strategy.make_runner(torch.nn.Sequential(torch.nn.Linear(2, 2)), stage_index=0, group=None)


@pytest.mark.parametrize(("node", "expected"), [({}, "cpu"), ({"device": "cpu"}, "cpu"), ({"device": "auto"}, "cpu")])
@no_cuda
def test_client_trains_on_the_cpu_without_a_gpu(node: dict[str, str], expected: str) -> None:
    from fedge.plugins.fl.local import node_device

    assert node_device(node) == expected


@pytest.mark.parametrize(
    ("node", "message"),
    [({"device": "gpu"}, "device must be auto, cpu or cuda, got 'gpu'"), ({"device": "cuda"}, "sees no CUDA GPU")],
)
@no_cuda
def test_client_device_mistakes_are_one_line(node: dict[str, str], message: str) -> None:
    from fedge.plugins.fl.local import node_device

    with pytest.raises(ValueError, match=message):
        node_device(node)


@no_cuda
def test_train_on_cuda_without_a_gpu_stops_before_anything_starts(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedge.cli.app import main

    code = main(["train", "--device", "cuda", "--steps", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "--device cuda needs a CUDA GPU, but torch" in err and "use --device cpu" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
