"""The per-rank trainer that torchrun starts: ``python -m fedge.plugins.train.trainer RUN_DIR``.

It reads ``RUN_DIR/config.toml`` (written by ``fedge train``), joins the process group that torchrun set
up (with a timeout), builds the same model on every rank, resumes from the newest complete checkpoint if
there is one (a torchrun restart or ``--resume``), and runs the strategy step by step. Rank 0 logs
``metrics.jsonl`` and writes ``model.pt`` + ``model.json`` + ``summary.json`` at the end.

Batches: every rank draws the same global batch from (seed, step) - a fresh permutation of the training
set each epoch, cut into consecutive batches - and the strategy takes its rows, so each epoch is split
into disjoint per-rank shards as with ``DistributedSampler``, and a resumed run sees the same batches.

Several nodes (``python -m fedge.plugins.train.trainer RUN_DIR NODE_TAG``, each node with its own run
directory or one they share): the ranks first check that every node runs the same job (settings and
training set) and, when checkpointing, that every node sees rank 0's run directory; each node's local rank
0 writes ``nodes/NODE_TAG.json`` (its node rank and ranks) for that node's ``fedge train`` to report.

A user error (a :class:`~fedge.errors.FedgeError`) is written as the failure record ``errors/rank-R.json``
for the launcher to report, and the process exits with the error's code. A lost peer (a connection reset or a
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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from fedge.config import from_mapping, load_toml, to_mapping
from fedge.errors import ConfigError, FedgeError
from fedge.failure import record_failure
from fedge.plugins.train.base import DistContext, resolve_strategy, strategy_config
from fedge.plugins.train.checkpoint import Checkpointer
from fedge.plugins.train.config import NODE_SETTINGS, TrainConfig
from fedge.rundir import RunDir, atomic_write_text

if TYPE_CHECKING:
    from fedge.plugins.data.base import ArrayDataset

__all__ = ["BatchOrder", "MetricsWriter", "RankEnv", "Trainer", "device_for", "failure_file", "main", "run"]


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


class MetricsWriter:
    """Rank 0's ``metrics.jsonl``: one line per step; lines of steps a resume redoes are dropped first."""

    def __init__(self, run: RunDir, *, enabled: bool, batch_size: int) -> None:
        self.run, self.enabled, self.batch_size = run, enabled, batch_size

    def trim(self, start: int) -> None:
        """Drop the lines of steps after ``start``: they are about to be redone."""
        if self.enabled:
            records = [r for r in self.run.read_metrics() if int(r.get("step", 0)) <= start]
            self.run.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def write(self, step: int, loss: float, step_s: float, extra: dict[str, float]) -> None:
        """The line of the step with 0-based index ``step``."""
        if self.enabled:
            record = {"step": step + 1, "loss": loss, "samples_per_s": self.batch_size / step_s, "step_s": step_s}
            self.run.append_metrics({**record, **extra})


@dataclass(frozen=True, slots=True)
class RankEnv:
    """This process's place in the job, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    restart: int
    num_nodes: int

    @classmethod
    def from_environ(cls) -> RankEnv:
        env = os.environ
        return cls(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
            restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), num_nodes=int(env.get("GROUP_WORLD_SIZE", "1")),
        )  # fmt: skip


def device_for(backend: str, local_rank: int, choice: str = "auto") -> torch.device:
    """Where a rank's tensors live: the one place device placement is decided.

    ``auto``: CUDA with NCCL, else the CPU; ``cuda``: a GPU whatever the backend, ranks beyond the GPU count
    sharing GPUs round-robin (gloo only: NCCL refuses two ranks on one GPU).
    """
    if choice == "cpu" or (choice == "auto" and backend != "nccl"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device cuda (backend {backend}) needs a CUDA GPU, but torch {torch.__version__} sees none; "
            "use --device cpu and --backend gloo"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


class Trainer:
    """One rank of a ``fedge train`` job: builds data, model and strategy, runs the steps, writes the results.

    It owns a :class:`~fedge.plugins.train.checkpoint.Checkpointer` and a :class:`MetricsWriter` and passes
    each step's index to the strategy.

    Args:
        run: the run directory ``fedge train`` wrote on this node (``config.toml`` in it).
        env: this rank's place in the job.
        node_tag: multi-node jobs: this node's local rank 0 writes ``nodes/<node_tag>.json``.
    """

    def __init__(self, run: RunDir, env: RankEnv, node_tag: str = "") -> None:
        self.run, self.env, self.node_tag = run, env, node_tag
        self.cfg = from_mapping(TrainConfig, load_toml(run.file("config.toml")))
        self.cls = resolve_strategy(self.cfg.strategy)
        self.strategy_config = strategy_config(self.cls, self.cfg.strategy_options, self.cfg.strategy)
        self.cls.check_world_size(self.strategy_config, env.world_size, self.cfg.batch_size)
        self.backend = _backend(self.cfg.backend, env.local_world_size, self.cfg.device)
        self.device = torch.device("cpu")
        self.checkpointer = Checkpointer(
            run.path, strategy_name=self.cfg.strategy, every=self.cfg.checkpoint_every, keep=self.cfg.keep_checkpoints,
            replicated=self.cls.replicated, rank=env.rank, world_size=env.world_size,
        )  # fmt: skip
        self.metrics = MetricsWriter(run, enabled=env.rank == 0, batch_size=self.cfg.batch_size)

    def run_job(self) -> None:
        """Join the process group, train, and leave it (also on error)."""
        self.device = device = device_for(self.backend, self.env.local_rank, self.cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # device_id binds NCCL's communicator to this rank's GPU up front (no guessing at the first barrier).
        dist.init_process_group(
            self.backend, timeout=timedelta(seconds=self.cfg.timeout_s), device_id=device if self.backend == "nccl" else None
        )
        try:
            ctx = DistContext(
                rank=self.env.rank, world_size=self.env.world_size, local_rank=self.env.local_rank,
                backend=self.backend, device=device,
            )  # fmt: skip
            self._train(ctx)
            dist.barrier()
        finally:
            dist.destroy_process_group()

    def _train(self, ctx: DistContext) -> None:
        from fedge.plugins.data import load_dataset

        cfg, env = self.cfg, self.env
        data = load_dataset(cfg.dataset, cfg.dataset_options)
        self._check_nodes(data)
        x_all, y_all = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
        order = BatchOrder(len(x_all), cfg.batch_size, cfg.seed)
        num_steps = cfg.epochs * order.per_epoch if cfg.epochs else cfg.steps
        strategy = self.cls(self.strategy_config, ctx)
        strategy.setup(self._build_model(data))
        start = self.checkpointer.restore(strategy)
        self.metrics.trim(start)
        prof = self._profiler(num_steps - start)
        loss = float("nan")
        for step in range(start, num_steps):
            self._fault_drill(step)
            t0 = time.perf_counter()
            idx = order.indices(step)
            loss = strategy.train_step(x_all[idx], y_all[idx], step=step)
            step_s = time.perf_counter() - t0
            if prof is not None:
                prof.step()
            self.metrics.write(step, loss, step_s, strategy.step_metrics())
            if self.checkpointer.due(step + 1, num_steps):
                self.checkpointer.save(strategy, step + 1)
        if prof is not None:
            prof.stop()
        state = strategy.full_state_dict()
        strategy.close()
        if env.rank == 0:
            assert state is not None
            self._finish(data, state, num_steps=num_steps, start=start, loss=loss)

    def _build_model(self, data: ArrayDataset) -> torch.nn.Module:
        from fedge.plugins.models import build_model

        options = {"seed": self.cfg.seed, **self.cfg.model_options}
        return build_model(self.cfg.model, options, input_shape=data.input_shape, num_classes=data.num_classes)

    def _check_nodes(self, data: ArrayDataset) -> None:
        """Multi-node jobs: say which node this is, and check every node runs the same job."""
        if self.node_tag and self.env.local_rank == 0:
            _write_node_file(
                self.run, self.node_tag, num_nodes=self.env.num_nodes, first_rank=self.env.rank,
                local_world=self.env.local_world_size, world=self.env.world_size,
            )  # fmt: skip
        if self.env.num_nodes > 1:
            _check_same_job(self.cfg, data)
            if self.cfg.checkpoint_every:
                _check_shared_run_dir(self.run, self.env.rank)

    def _profiler(self, steps_left: int) -> torch.profiler.profile | None:
        # One trace per rank: a restarted or resumed rank that already wrote one does not write another.
        traced = any(self.run.file("traces").glob(f"rank{self.env.rank}.*.pt.trace.json*"))
        if not self.cfg.profile or traced or steps_left <= 0:
            return None
        prof = _profiler(self.run.path, self.env.rank, steps_left, self.device)
        prof.start()
        return prof

    def _fault_drill(self, step: int) -> None:
        if not self.cfg.fault_at or self.env.restart:
            return
        rank, _, at = self.cfg.fault_at.partition(":")
        if self.env.rank == int(rank) and step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)  # die as an OOM-killed worker would

    def _finish(self, data: ArrayDataset, state: dict[str, torch.Tensor], *, num_steps: int, start: int, loss: float) -> None:
        from fedge.plugins.models import save_model
        from fedge.plugins.train.single_process import evaluate

        cfg = self.cfg
        final = self._build_model(data)
        final.load_state_dict(state)
        test_loss, accuracy = evaluate(final, data.x_test, data.y_test)
        save_model(final, self.run.path, extra={"dataset": cfg.dataset, "strategy": cfg.strategy, "steps": num_steps})
        summary = {
            "strategy": cfg.strategy, "world_size": self.env.world_size, "backend": self.backend, "steps": num_steps,
            "resumed_from_step": start or None, "restarts": self.env.restart, "final_loss": loss,
            "test_loss": test_loss, "test_accuracy": accuracy, "device": self.device.type,
            "peak_rss_bytes": _peak_rss_bytes(), **_cuda_memory(self.device),
        }  # fmt: skip
        self.run.write_json("summary.json", summary)


def _peak_rss_bytes() -> int:
    """Rank 0's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _cuda_memory(device: torch.device) -> dict[str, int]:
    """Rank 0's peak CUDA memory (torch's caching allocator), for summary.json; nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {
        "cuda_max_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "cuda_max_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


def run(run_dir: Path, node_tag: str = "") -> None:
    """Train as one rank of the torchrun job described by ``run_dir/config.toml``."""
    Trainer(RunDir(run_dir), RankEnv.from_environ(), node_tag).run_job()


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


def _check_same_job(cfg: TrainConfig, data: ArrayDataset) -> None:
    """Every rank must run the job rank 0 runs: nodes started with other flags would train something else
    (or hang in mismatched collectives), so all ranks compare and all fail with the same line."""
    mine = {k: v for k, v in to_mapping(cfg).items() if k not in NODE_SETTINGS}
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


def failure_file(run_dir: Path, rank: int | str) -> Path:
    """Where rank ``rank`` leaves its failure record."""
    return run_dir / "errors" / f"rank-{rank}.json"


def main(argv: list[str] | None = None) -> int:
    """Entry point under torchrun; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m fedge.plugins.train.trainer RUN_DIR [NODE_TAG] (started by fedge train)", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    rank = os.environ.get("RANK", "0")
    record = failure_file(run_dir, rank)
    record.unlink(missing_ok=True)  # from an earlier attempt
    try:
        run(run_dir, argv[1] if len(argv) == 2 else "")
    except FedgeError as err:
        record_failure(record, err)
        print(f"fedge train rank {rank}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        code, message = _describe_failure(rank, err)
        record_failure(record, message, exit_code=code)
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
            "crashed or hung; see logs/train.log on every node"
        )
    first = (text.strip().splitlines() or [""])[0][:300]
    return 70, f"rank {rank} failed: {type(err).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())
