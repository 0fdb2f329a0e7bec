"""Fixtures for model-parallel tests: run a function on N forked gloo processes and collect what each returns."""

from __future__ import annotations

import datetime
import io
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _entry(rank: int, fn: Callable[..., Any], world_size: int, store_path: str, out_dir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture
def run_dist(tmp_path: Path) -> Callable[..., list[Any]]:
    """``run_dist(fn, world_size, *args)`` -> [fn(rank, world_size, *args) for each rank], run in forked processes.

    Forked (not spawned) so ``fn`` may live in a test module, which a spawned child could not import.
    """

    def run(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
        import torch
        import torch.multiprocessing as mp

        out = tmp_path / f"dist-{fn.__name__}"
        out.mkdir()
        try:
            mp.start_processes(
                _entry,
                args=(fn, world_size, str(out / "store"), str(out), args),
                nprocs=world_size,
                start_method="fork",
            )
        except mp.ProcessRaisedException as err:
            errors = "\n".join(p.read_text() for p in sorted(out.glob("*.err")))
            raise AssertionError(f"a rank failed:\n{errors or err}") from None
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

    return run


TINY_GPT = {"d_model": 32, "num_heads": 4, "num_layers": 2}
BATCH = 16


def make_model(options: dict | None = None):
    """The tiny-gpt of every parity test (d_model 32, 4 heads, 2 blocks): on 8x8 one-channel images, or on
    sequences of 8 token ids when ``options`` has a ``vocab_size``."""
    from fedge.plugins.models import build_model

    options = {**TINY_GPT, **(options or {})}
    shape = (8,) if options.get("vocab_size") else (1, 8, 8)
    return build_model("tiny-gpt", options, input_shape=shape, num_classes=10)


def global_batch(step: int, rows: int = BATCH, vocab_size: int = 0):
    """The global batch of ``step``: the same on every rank, drawn from (seed=step)."""
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    x = (
        torch.randint(0, vocab_size, (rows, 8), generator=gen)
        if vocab_size
        else torch.randn(rows, 1, 8, 8, generator=gen)
    )
    return x, torch.randint(0, 10, (rows,), generator=gen)


def train_single(steps: int, *, lr: float = 0.05, momentum: float = 0.9, options: dict | None = None):
    """Single-process reference: SGD with momentum, mean cross-entropy over each global batch."""
    import torch
    import torch.nn.functional as F

    model = make_model(options)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for step in range(steps):
        x, y = global_batch(step, vocab_size=(options or {}).get("vocab_size", 0))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, model.state_dict()


def train_strategy(
    rank: int, world_size: int, cls, config: dict, steps: int, resume_at: int | None = None, options: dict | None = None
):
    """Train with strategy ``cls`` on this rank; returns (losses, full_state_dict or None, the strategy's last_metrics).

    With ``resume_at``, the strategy is rebuilt before that step from its ``state_for_checkpoint``.
    """
    import torch

    from fedge.config import from_mapping
    from fedge.plugins.train.base import DistContext

    ctx = DistContext(rank=rank, world_size=world_size, local_rank=rank, backend="gloo", device=torch.device("cpu"))
    strategy = cls(from_mapping(cls.Config, config), ctx)
    strategy.setup(make_model(options))
    losses = []
    for step in range(steps):
        if step == resume_at:  # a fresh strategy and model, restored from this rank's checkpoint state
            buffer = io.BytesIO()
            torch.save(strategy.state_for_checkpoint(), buffer)
            buffer.seek(0)
            state = torch.load(buffer, weights_only=False)
            strategy = cls(from_mapping(cls.Config, config), ctx)
            strategy.setup(make_model({**(options or {}), "seed": 123}))
            strategy.load_checkpoint_state(state)
        x, y = global_batch(step, vocab_size=(options or {}).get("vocab_size", 0))
        losses.append(strategy.train_step(x, y, step=step))
    return losses, strategy.full_state_dict(), strategy.step_metrics()


def assert_same_training(results, reference):
    """Every rank's losses match the single-process ``reference``; rank 0 alone returns the full state, equal to it."""
    import torch

    ref_losses, ref_state = reference
    for losses, _, _ in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    state = results[0][1]
    assert state is not None and all(r[1] is None for r in results[1:])
    assert set(state) == set(ref_state)
    for key, value in ref_state.items():
        assert state[key].shape == value.shape, key
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture
def parity():
    """The helpers above, for test modules (which cannot import conftest)."""
    import types

    return types.SimpleNamespace(
        make_model=make_model,
        global_batch=global_batch,
        train_single=train_single,
        train_strategy=train_strategy,
        assert_same_training=assert_same_training,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_rank(rank: int, world_size: int, run_dir: str, port: int) -> None:
    import torch

    from fedge.plugins.train.trainer import run

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    run(Path(run_dir))


@pytest.fixture
def run_workers():
    """``run_workers(world_size, run_dir, **settings)``: write config.toml, then run the real worker loop
    (``fedge.plugins.train.trainer.run``, what torchrun starts) on forked gloo processes."""

    def run(world_size: int, run_dir: Path, **settings: Any) -> None:
        import torch.multiprocessing as mp

        from fedge.config import from_mapping, to_mapping
        from fedge.plugins.train.config import TrainConfig
        from fedge.rundir import RunDir

        RunDir(run_dir).write_config(to_mapping(from_mapping(TrainConfig, settings)))
        mp.start_processes(
            _worker_rank, args=(world_size, str(run_dir), _free_port()), nprocs=world_size, start_method="fork"
        )

    return run
