"""The per-rank training loop that torchrun starts: ``python -m fedge.plugins.train.worker RUN_DIR``.

It reads ``RUN_DIR/config.toml`` (written by ``fedge train``), joins the process group that torchrun set
up (with a timeout), builds the same model on every rank, resumes from the newest complete checkpoint if
there is one (a torchrun restart or ``--resume``), and runs the strategy step by step. Rank 0 logs
``metrics.jsonl`` and writes ``model.pt`` + ``model.json`` + ``summary.json`` at the end.

Batches: every rank draws the same global batch from (seed, step) - a fresh permutation of the training
set each epoch, cut into consecutive batches - and the strategy takes its rows, so each epoch is split
into disjoint per-rank shards as with ``DistributedSampler``, and a resumed run sees the same batches.

Several nodes (``python -m fedge.plugins.train.worker RUN_DIR NODE_TAG``, each node with its own run
directory or one they share): the ranks first check that every node runs the same job (settings and
training set) and, when checkpointing, that every node sees rank 0's run directory; each node's local rank
0 writes ``nodes/NODE_TAG.json`` (its node rank and ranks) for that node's ``fedge train`` to report.

A user error (a :class:`~fedge.errors.FedgeError`) is written as one line to ``errors/rank-R.txt`` for the
launcher to report, and the process exits with the error's code. A lost peer (a connection reset or a
collective timing out) is one line with exit code 3; anything else, one line with code 70.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from fedge.config import from_mapping, load_toml, to_mapping
from fedge.errors import ConfigError, FedgeError
from fedge.plugins.train import checkpoint
from fedge.plugins.train.base import DistContext, Strategy
from fedge.plugins.train.config import TrainConfig
from fedge.registry import Kind, Registry
from fedge.rundir import RunDir, atomic_write_text

if TYPE_CHECKING:
    from fedge.plugins.data.base import ArrayDataset

__all__ = ["BatchOrder", "main", "resolve_strategy", "run", "strategy_config"]


def resolve_strategy(name: str) -> type[Strategy]:
    """The strategy plugin ``name``, checked to be a torch.distributed :class:`Strategy`.

    Raises:
        PluginNotFoundError: no such strategy (the message lists the valid names).
        ConfigError: the plugin exists but is not a cluster-training strategy (e.g. a Flower one).
    """
    registry: Registry[Any] = Registry(Kind.STRATEGY)
    cls = registry.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        usable = [n for n in registry.names() if _is_strategy(registry, n)]
        raise ConfigError(
            f"strategy {name!r} is not a torch.distributed strategy and cannot run under fedge train; "
            f"use one of: {', '.join(usable)}"
        )
    return cls


def _is_strategy(registry: Registry[Any], name: str) -> bool:
    try:
        obj = registry.get(name)
    except FedgeError:
        return False
    return isinstance(obj, type) and issubclass(obj, Strategy)


def strategy_config(cls: type[Strategy], options: dict[str, Any], name: str) -> Any:
    """Build ``cls.Config`` from the ``[strategy_options]`` table."""
    return from_mapping(cls.Config, options, where=f"strategy_options ({name})")


class BatchOrder:
    """The global batch of every step: epoch e is ``randperm(n)`` seeded by (seed, e), cut into batches."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size > n:
            raise ConfigError(f"batch size {batch_size} is larger than the training set ({n} samples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


def _backend(choice: str, local_world_size: int, device: str = "auto") -> str:
    if choice != "auto":
        return choice
    if device == "cpu":  # NCCL takes CUDA tensors only
        return "gloo"
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size else "gloo"


def _device(choice: str, backend: str, local_rank: int) -> torch.device:
    """This rank's device: CUDA with NCCL (or when asked for), else the CPU.

    Ranks beyond the GPU count share GPUs round-robin (gloo only: NCCL refuses two ranks on one GPU).
    """
    if choice == "cpu" or (choice == "auto" and backend != "nccl"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device cuda (backend {backend}) needs a CUDA GPU, but torch {torch.__version__} sees none; "
            "use --device cpu and --backend gloo"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _profiler(run_dir: Path, rank: int, num_steps: int, device: torch.device) -> torch.profiler.profile:
    wait = 1 if num_steps >= 5 else 0
    warmup = 1 if num_steps >= 2 else 0
    active = max(1, min(3, num_steps - wait - warmup))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run_dir / "traces"), worker_name=f"rank{rank}"),
    )


def run(run_dir: Path, node_tag: str = "") -> None:
    """Train as one rank of the torchrun job described by ``run_dir/config.toml``.

    Args:
        run_dir: the run directory ``fedge train`` wrote on this node.
        node_tag: multi-node jobs: this node's local rank 0 writes ``nodes/<node_tag>.json``.
    """
    from fedge.plugins.data import load_dataset
    from fedge.plugins.models import build_model, save_model
    from fedge.plugins.training import evaluate

    run = RunDir(run_dir)
    cfg = from_mapping(TrainConfig, load_toml(run.file("config.toml")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    cls = resolve_strategy(cfg.strategy)
    scfg = strategy_config(cls, cfg.strategy_options, cfg.strategy)
    cls.check_world_size(scfg, world, cfg.batch_size)
    backend = _backend(cfg.backend, local_world, cfg.device)
    device = _device(cfg.device, backend, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # device_id binds NCCL's communicator to this rank's GPU up front (no guessing at the first barrier).
    bound = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s), **bound)
    try:
        ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)
        data = load_dataset(cfg.dataset, cfg.dataset_options)
        num_nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        if node_tag and local_rank == 0:
            _write_node_file(run, node_tag, num_nodes=num_nodes, first_rank=rank, local_world=local_world, world=world)
        if num_nodes > 1:
            _check_same_job(cfg, data)
            if cfg.checkpoint_every:
                _check_shared_run_dir(run, rank)
        x_all, y_all = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
        order = BatchOrder(len(x_all), cfg.batch_size, cfg.seed)
        num_steps = cfg.epochs * order.per_epoch if cfg.epochs else cfg.steps
        model_options = {"seed": cfg.seed, **cfg.model_options}
        model = build_model(cfg.model, model_options, input_shape=data.input_shape, num_classes=data.num_classes)
        strategy = cls(scfg, ctx)
        strategy.setup(model)

        start = _resume(run.path, strategy, cls, cfg, world, rank)
        if rank == 0:
            _trim_metrics(run, start)
        fault_rank, _, fault_step = cfg.fault_at.partition(":")
        # One trace per rank: a restarted or resumed rank that already wrote one does not write another.
        traced = any(run.file("traces").glob(f"rank{rank}.*.pt.trace.json*"))
        prof = _profiler(run.path, rank, num_steps - start, device) if cfg.profile and not traced and start < num_steps else None
        if prof is not None:
            prof.start()
        loss = float("nan")
        for step in range(start, num_steps):
            if cfg.fault_at and restart == 0 and rank == int(fault_rank) and step == int(fault_step):
                os.kill(os.getpid(), signal.SIGKILL)  # fault drill: die as an OOM-killed worker would
            t0 = time.perf_counter()
            idx = order.indices(step)
            strategy.step = step
            loss = strategy.train_step(x_all[idx], y_all[idx])
            step_s = time.perf_counter() - t0
            if prof is not None:
                prof.step()
            if rank == 0:
                run.append_metrics(
                    {
                        "step": step + 1,
                        "loss": loss,
                        "samples_per_s": cfg.batch_size / step_s,
                        "step_s": step_s,
                        **strategy.step_metrics(),
                    }
                )
            if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == num_steps):
                _save(run.path, strategy, cls, cfg, world, rank, step + 1)
        if prof is not None:
            prof.stop()

        state = strategy.full_state_dict()
        strategy.close()
        if rank == 0:
            assert state is not None
            final = build_model(cfg.model, model_options, input_shape=data.input_shape, num_classes=data.num_classes)
            final.load_state_dict(state)
            test_loss, accuracy = evaluate(final, data.x_test, data.y_test)
            save_model(final, run.path, extra={"dataset": cfg.dataset, "strategy": cfg.strategy, "steps": num_steps})
            run.write_json(
                "summary.json",
                {
                    "strategy": cfg.strategy,
                    "world_size": world,
                    "backend": backend,
                    "steps": num_steps,
                    "resumed_from_step": start or None,
                    "restarts": restart,
                    "final_loss": loss,
                    "test_loss": test_loss,
                    "test_accuracy": accuracy,
                    "device": device.type,
                    **_cuda_memory(device),
                },
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _cuda_memory(device: torch.device) -> dict[str, int]:
    """Rank 0's peak CUDA memory (torch's caching allocator), for summary.json; nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {
        "cuda_max_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "cuda_max_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


def _write_node_file(run: RunDir, tag: str, *, num_nodes: int, first_rank: int, local_world: int, world: int) -> None:
    """Tell this node's ``fedge train`` which node of the job it is (rewritten after every re-rendezvous).

    torchrun puts node 0 (the node of rank 0) wherever its rendezvous sorts first, not necessarily on the
    host of ``--rdzv-endpoint``.
    """
    record = {
        "node_rank": int(os.environ.get("GROUP_RANK", "0")),
        "num_nodes": num_nodes,
        "ranks": [first_rank, first_rank + local_world - 1],
        "world_size": world,
        "rank0_host": os.environ.get("MASTER_ADDR", ""),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }
    run.write_json(f"nodes/{tag}.json", record)


# Settings a node may set for itself: how it joins (and restarts), and where its data lies (the data
# itself is compared instead).
_NODE_SETTINGS = frozenset(
    {"nproc", "nnodes", "rdzv_endpoint", "rdzv_id", "rdzv_timeout_s", "rdzv_last_call_s", "max_restarts", "dataset_options"}
)


def _check_same_job(cfg: TrainConfig, data: ArrayDataset) -> None:
    """Every rank must run the job rank 0 runs: nodes started with other flags would train something else
    (or hang in mismatched collectives), so all ranks compare and all fail with the same line."""
    mine = {k: v for k, v in to_mapping(cfg).items() if k not in _NODE_SETTINGS}
    mine["training set (samples, input shape, classes)"] = (len(data.x_train), tuple(data.input_shape), data.num_classes)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ref = everyone[0]
    for r, other in enumerate(everyone):
        diff = sorted(k for k in ref.keys() | other.keys() if ref.get(k) != other.get(k))
        if diff:
            shown = "; ".join(f"{k} is {other.get(k)!r} on rank {r} but {ref.get(k)!r} on rank 0" for k in diff[:3])
            raise ConfigError(
                f"the nodes of this job were started with different settings: {shown}; "
                "start every node with the same flags, config file and training data"
            )


def _check_shared_run_dir(run: RunDir, rank: int) -> None:
    """Checkpoints of a multi-node job must be one directory every node sees: rank 0 names a checkpoint in
    its run directory and, on a restart, every rank resumes from what its own run directory names."""
    marker = run.file("checkpoints") / ".rank0-marker"
    box: list[Any] = [f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}" if rank == 0 else None]
    if rank == 0:
        atomic_write_text(marker, box[0])  # before the broadcast, so every rank can read it after
    dist.broadcast_object_list(box, src=0)
    sees = marker.is_file() and marker.read_text(encoding="utf-8") == box[0]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (sees, socket.gethostname()))
    if rank == 0:
        marker.unlink(missing_ok=True)  # every rank has looked (all_gather_object returned)
    blind = [(r, host) for r, (ok, host) in enumerate(everyone) if not ok]
    if blind:
        r, host = blind[0]
        raise ConfigError(
            f"--checkpoint-every on several nodes needs one run directory that every node shares, but rank {r} "
            f"(on {host}) does not see rank 0's; give every node the same --out on a shared filesystem, "
            "or leave --checkpoint-every out"
        )


def _resume(run_dir: Path, strategy: Strategy, cls: type[Strategy], cfg: TrainConfig, world: int, rank: int) -> int:
    meta = checkpoint.latest(run_dir)
    if meta is None:
        return 0
    if meta.get("strategy") != cfg.strategy:
        raise ConfigError(
            f"the checkpoint in {str(run_dir)!r} was written by strategy {meta.get('strategy')!r}, not {cfg.strategy!r}; "
            "resume with the same strategy or use a new --out directory"
        )
    if not cls.replicated and meta.get("world_size") != world:
        raise ConfigError(
            f"the checkpoint in {str(run_dir)!r} holds {meta.get('world_size')} ranks' shards but this job has {world} "
            f"processes; {cfg.strategy} resumes only at the same world size"
        )
    step = int(meta["step"])
    own = checkpoint.load_rank(run_dir, step, rank) if rank < int(meta["world_size"]) else None
    payload = checkpoint.load_rank(run_dir, step, 0) if cls.replicated else own
    assert payload is not None
    strategy.load_checkpoint_state(payload["strategy"])
    checkpoint.set_rng_state((own or payload)["rng"])
    return step


def _save(run_dir: Path, strategy: Strategy, cls: type[Strategy], cfg: TrainConfig, world: int, rank: int, step: int) -> None:
    payload: dict[str, Any] = {"step": step, "rng": checkpoint.rng_state()}
    if rank == 0 or not cls.replicated:
        payload["strategy"] = strategy.state_for_checkpoint()
    checkpoint.save_rank(run_dir, step, rank, payload)
    dist.barrier()  # latest.json may only name a checkpoint every rank has finished writing
    if rank == 0:
        meta = {"step": step, "world_size": world, "strategy": cfg.strategy, "replicated": cls.replicated}
        checkpoint.write_latest(run_dir, meta, keep=cfg.keep_checkpoints)


def _trim_metrics(run: RunDir, start: int) -> None:
    """Drop metric lines of steps after the checkpoint we resume from: they are about to be redone."""
    records = [r for r in run.read_metrics() if int(r.get("step", 0)) <= start]
    run.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> int:
    """Entry point under torchrun; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m fedge.plugins.train.worker RUN_DIR [NODE_TAG] (started by fedge train)", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    rank = os.environ.get("RANK", "0")
    (run_dir / "errors" / f"rank-{rank}.txt").unlink(missing_ok=True)  # from an earlier attempt
    try:
        run(run_dir, argv[1] if len(argv) == 2 else "")
    except FedgeError as err:
        atomic_write_text(run_dir / "errors" / f"rank-{rank}.txt", f"{err.exit_code} {err}\n")
        print(f"fedge train rank {rank}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        code, message = _describe_failure(rank, err)
        atomic_write_text(run_dir / "errors" / f"rank-{rank}.txt", f"{code} {message}\n")
        raise
    return 0


# How gloo and NCCL say that another rank went away; their messages run over several lines.
_PEER_LOST = re.compile(
    r"Connection (?:closed|reset) by peer|Broken pipe|Connection refused|Timed out waiting \d+ms for \w+ operation"
    r"|NCCL communicator was aborted|Socket Timeout"
)


def _describe_failure(rank: str, err: Exception) -> tuple[int, str]:
    """(exit code, one line) for an unexpected error: 3 when another rank went away, else 70."""
    text = str(err)
    lost = _PEER_LOST.search(text)
    if lost or isinstance(err, dist.DistError):
        what = lost.group(0) if lost else (text.strip().splitlines() or [type(err).__name__])[0][:200]
        return 3, (
            f"rank {rank} lost contact with another rank ({what}): a process or node of this job stopped, "
            "crashed or hung; see train.log on every node"
        )
    first = (text.strip().splitlines() or [""])[0][:300]
    return 70, f"rank {rank} failed: {type(err).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())
