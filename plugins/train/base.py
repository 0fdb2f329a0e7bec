"""The contract every torch.distributed strategy implements, and the helpers they share.

A strategy turns "one optimizer step on a global batch" into whatever its processes must do: slice the
batch and all-reduce gradients (data parallel), push to and pull from parameter servers, run pipeline
stages or tensor shards. The :class:`~fedge.plugins.train.trainer.Trainer` (run under torchrun) drives it::

    strategy = StrategyClass(config, ctx)          # config: StrategyClass.Config, ctx: DistContext
    strategy.setup(model)                          # the full model, built identically on every rank
    for step in range(start, steps):
        loss = strategy.train_step(x, y, step=step)  # x, y: the GLOBAL batch; step: 0-based index
        if checkpoint due: save strategy.state_for_checkpoint() per rank
    state = strategy.full_state_dict()             # collective: every rank calls it; rank 0 gets the dict
    strategy.close()

Parity (what the tests check): single-process training is the same model (same seed), SGD with the same
lr/momentum, stepping on the same global batches with mean cross-entropy over the global batch. A strategy
on W processes must give the same parameters after K steps (fp32, rtol 1e-5).

What a strategy plugin looks like::

    @plugin("strategy", "my-strategy")
    class MyStrategy(Strategy):
        \"\"\"One-line summary shown by ``fedge plugins``.\"\"\"

        @dataclass(frozen=True, kw_only=True, slots=True)
        class Config(StrategyConfig):
            chunk_bytes: int = 1 << 20
            \"\"\"Docstring under every field.\"\"\"

        def setup(self, model): ...
        def train_step(self, x, y, *, step): ...
        def full_state_dict(self): ...

Shared helpers: :meth:`Strategy.lr_at` (linear lr scaling + warm-up), :meth:`Strategy.make_optimizer`,
:func:`set_lr`, :func:`batch_rows` (this rank's rows of the global batch), :meth:`Strategy.check_world_size`
(called by the launcher before anything starts, and by the trainer).

Strategies are found through :func:`strategy_registry`, typed by :class:`StrategyPlugin`; the parity
test trains every registered strategy's :attr:`Strategy.parity_cases` and compares with single-process SGD.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from fedge.errors import ConfigError, FedgeError
from fedge.registry import Kind, Registry

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from fedge.plugins.train.blocks import BlockControl

__all__ = [
    "DistContext",
    "ParityCase",
    "Strategy",
    "StrategyConfig",
    "StrategyPlugin",
    "batch_rows",
    "load_sgd_state",
    "resolve_strategy",
    "set_lr",
    "sgd_state",
    "strategy_config",
    "strategy_registry",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategyConfig:
    """Settings every strategy has: the optimizer (SGD with momentum) and the learning-rate rule."""

    lr: float = 0.05
    """Learning rate of SGD (for ``base_batch_size`` samples when ``lr_scaling`` is ``linear``)."""
    momentum: float = 0.9
    """SGD momentum."""
    lr_scaling: Literal["none", "linear"] = "none"
    """``linear``: lr x global_batch / base_batch_size (Goyal et al., 2017); ``none``: lr as given."""
    base_batch_size: int = 32
    """The batch size ``lr`` was tuned for (``lr_scaling = "linear"`` only)."""
    warmup_steps: int = 0
    """Ramp the lr linearly from ``lr`` to the scaled lr over this many steps (needs ``lr_scaling = "linear"``)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16``: forward and backward under torch.autocast(bfloat16), CPU or GPU; weights, gradients and the
    optimizer stay fp32 (master weights)."""
    freeze: str = ""
    """Layer freezing schedule over the model's blocks (top-level layers with parameters): ``first:K`` freezes
    the first K blocks, ``first:K@S`` from step S; ``progressive:N[@S]`` freezes block 0 at step S, one more every
    N steps, never the last. Frozen blocks get no gradient, are not communicated and run forward without autograd."""
    recompute: str = ""
    """Activation recomputation per block: ``all``, or block indices such as ``0,2`` or ``1-3``; each chosen block
    keeps only its input and redoes its forward in backward (torch.utils.checkpoint, non-reentrant)."""

    def __post_init__(self) -> None:
        from fedge.plugins.train.blocks import parse_freeze, parse_recompute

        parse_freeze(self.freeze)
        parse_recompute(self.recompute)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.base_batch_size < 1:
            raise ValueError(f"base_batch_size must be >= 1, got {self.base_batch_size}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps and self.lr_scaling == "none":
            raise ValueError("warmup_steps ramps towards the scaled lr, so it needs lr_scaling = 'linear'")


@dataclass(frozen=True, slots=True)
class DistContext:
    """What a worker knows about its job (from torchrun's environment and the process group)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    """``gloo`` or ``nccl``."""
    device: torch.device
    """Where this rank's tensors live: ``cuda:<local_rank>`` with NCCL, else ``cpu``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ParityCase:
    """A setting under which a strategy must train exactly like single-process SGD (fp32, rtol 1e-5)."""

    options: Mapping[str, Any] = field(default_factory=dict)
    """The strategy's Config fields for this case."""
    world_sizes: tuple[int, ...] = (2, 4)
    """Process counts the parity test runs it at."""
    model: str = "mlp"
    """Model plugin of the case (``tiny-gpt`` for strategies that split attention blocks)."""


@runtime_checkable
class StrategyPlugin(Protocol):
    """What a ``strategy`` plugin is: a class with a typed ``Config`` that builds a :class:`Strategy`."""

    Config: type[StrategyConfig]
    replicated: bool
    parity_cases: Mapping[str, ParityCase]

    def __call__(self, config: Any, ctx: DistContext) -> Strategy: ...

    def check_world_size(self, config: Any, world_size: int, batch_size: int) -> None: ...


def strategy_registry() -> Registry[StrategyPlugin]:
    """The installed strategies (built-ins and third-party alike)."""
    return Registry(Kind.STRATEGY, StrategyPlugin)


def _is_strategy(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, Strategy) and isinstance(obj, StrategyPlugin)


def resolve_strategy(name: str, registry: Registry[StrategyPlugin] | None = None) -> type[Strategy]:
    """The strategy plugin ``name``, checked to be a torch.distributed :class:`Strategy`.

    Raises:
        PluginNotFoundError: no such strategy (the message lists the valid names).
        ConfigError: the plugin exists but is not a cluster-training strategy.
    """
    registry = registry or strategy_registry()
    cls = registry.get(name)
    if not _is_strategy(cls):
        usable = [n for n in registry.names() if _loads_as_strategy(registry, n)]
        raise ConfigError(
            f"strategy {name!r} is not a torch.distributed strategy and cannot run under fedge train; "
            f"use one of: {', '.join(usable)}"
        )
    return cls  # type: ignore[return-value]


def _loads_as_strategy(registry: Registry[StrategyPlugin], name: str) -> bool:
    try:
        return _is_strategy(registry.get(name))
    except FedgeError:
        return False


def strategy_config(cls: type[Strategy], options: Mapping[str, Any], name: str) -> StrategyConfig:
    """Build ``cls.Config`` from the ``[strategy_options]`` table (the one place strategy options are typed)."""
    from fedge.config import from_mapping

    config = from_mapping(cls.Config, dict(options), where=f"strategy_options ({name})")
    for option, supported in (("freeze", cls.freezes), ("recompute", cls.recomputes)):
        if getattr(config, option, "") and not supported:
            able = [n for n in strategy_registry().names() if getattr(_safe_get(n), option + "s", False)]
            raise ConfigError(
                f"strategy {name!r} does not support {option} (got {option}={getattr(config, option)!r}); "
                f"leave it out, or use one of: {', '.join(able)}"
            )
    return config


def _safe_get(name: str) -> object:
    try:
        return strategy_registry().get(name)
    except FedgeError:
        return None


def sgd_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A replicated model's and its SGD optimizer's state keyed by parameter name (world-size independent).

    A parameter that has not stepped yet gets a zero momentum buffer: with no dampening SGD's first step from
    zeros equals its first step from none, and a checkpoint template needs every tensor.
    """
    import torch

    momentum = {}
    for name, p in model.named_parameters():  # frozen ones too: the layout stays the same when a block freezes
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        momentum[name] = buf if buf is not None else torch.zeros_like(p)
    return {"model": model.state_dict(), "momentum": momentum}


def load_sgd_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what :func:`sgd_state` returned."""
    model.load_state_dict(state["model"])
    for name, p in model.named_parameters():
        if name in state["momentum"]:
            optimizer.state[p]["momentum_buffer"] = state["momentum"][name].detach().clone().to(p.device)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def batch_rows(x: Tensor, y: Tensor, index: int, parts: int) -> tuple[Tensor, Tensor]:
    """Rows ``[index*B/parts, (index+1)*B/parts)`` of the global batch (B divisible by ``parts``)."""
    n = x.shape[0] // parts
    assert n * parts == x.shape[0], "check_world_size guarantees the batch divides evenly"
    return x[index * n : (index + 1) * n], y[index * n : (index + 1) * n]


class Strategy(abc.ABC):
    """Base of every torch.distributed strategy: a few abstract hooks; the worker loop is the run loop.

    Attributes:
        config: this strategy's ``Config``.
        ctx: the process's :class:`DistContext`.
    """

    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    replicated: ClassVar[bool] = False
    """True when every rank's checkpoint state is identical (plain data parallel): only rank 0 writes it,
    and a job restarted with a different world size (``--nnodes MIN:MAX``) can still resume from it."""
    parity_cases: ClassVar[Mapping[str, ParityCase]] = {"default": ParityCase()}
    """Settings that must match single-process SGD; empty for a strategy that is not synchronous."""
    freezes: ClassVar[bool] = False
    """True when the strategy applies the ``freeze`` schedule (see :class:`~fedge.plugins.train.blocks.BlockControl`)."""
    recomputes: ClassVar[bool] = False
    """True when the strategy applies ``recompute``."""
    resizable: ClassVar[bool] = False
    """True when the strategy has :meth:`global_state`: its checkpoints are world-size independent (DCP), so a
    job resumes at another world size (2 -> 4 -> 2, an elastic job that lost a node, a migrated job)."""

    def __init__(self, config: StrategyConfig, ctx: DistContext) -> None:
        self.config = config
        self.ctx = ctx

    @classmethod
    def check_world_size(cls, config: StrategyConfig, world_size: int, batch_size: int) -> None:
        """Raise ConfigError if this strategy cannot run ``batch_size`` global batches on ``world_size`` ranks.

        The default is plain data parallelism: every rank takes an equal share of the batch.
        """
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if batch_size % world_size:
            raise ConfigError(
                f"batch size {batch_size} does not split evenly over {world_size} processes; "
                f"use a batch size divisible by {world_size}"
            )

    @abc.abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Take the full model (built identically on every rank from the same seed) and keep/wrap/shard
        what this rank needs; build the optimizer."""

    @abc.abstractmethod
    def train_step(self, x: Tensor, y: Tensor, *, step: int) -> float:
        """One optimizer step on the GLOBAL batch (x, y are identical on every rank); ``step`` is its 0-based
        index (lr schedules read it, and a resumed run passes the step it resumes at).

        The strategy takes the slice its rank needs (data parallel: rows ``[r*B/dp, (r+1)*B/dp)``; pipeline:
        micro-batches of the whole batch; megatron: its dp group's rows). Returns the global-batch mean loss,
        the same number on every rank; rank 0's is the ``loss`` of ``metrics.jsonl``. An asynchronous strategy,
        which has no global batch per step, returns the mean loss over all workers' updates applied since
        this rank's previous step (never one worker's own loss), so the logged curve is the whole job's.
        """

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The full model's state_dict with the same keys as single-process training, on rank 0; None elsewhere.

        A collective: every rank calls it (shards travel to rank 0).
        """

    def state_for_checkpoint(self) -> dict[str, Any]:
        """This rank's shard and optimizer state, for resume. The default saves ``self.model`` and
        ``self.optimizer`` when the strategy has them."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}  # type: ignore[attr-defined]

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_for_checkpoint` returned (called after ``setup``)."""
        self.model.load_state_dict(state["model"])  # type: ignore[attr-defined]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[attr-defined]

    def global_state(self) -> dict[str, Any]:
        """The training state as single-process SGD holds it, identical on every rank (a collective):
        ``{"model": state_dict, "momentum": {parameter name: buffer}}`` (see :func:`sgd_state`)."""
        raise NotImplementedError(f"{type(self).__name__} has no world-size independent state")

    def load_global_state(self, state: dict[str, Any], *, step: int) -> None:
        """Take this rank's part of what :meth:`global_state` returned (possibly at another world size)."""
        raise NotImplementedError(f"{type(self).__name__} has no world-size independent state")

    def close(self) -> None:
        """Release hooks, buffers and in-flight communication. Called once, after the last step."""

    def step_metrics(self) -> dict[str, float]:
        """Extra numbers about the last ``train_step`` for its metrics.jsonl line (e.g. a pipeline's
        measured ``bubble`` and ``bubble_formula``); the same on every rank. None by default."""
        return {}

    # -- helpers for subclasses -------------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager[None]:
        """Where a strategy runs its forward and loss: bf16 autocast when ``precision = "bf16"``."""
        import torch

        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def control_blocks(self, model: nn.Module, *, names: list[str] | None = None) -> BlockControl:
        """This config's freezing and recomputation applied to ``model`` (call :meth:`BlockControl.update` per step)."""
        from fedge.plugins.train.blocks import BlockControl

        return BlockControl(model, freeze=self.config.freeze, recompute=self.config.recompute, names=names)

    def lr_at(self, step: int, global_batch: int) -> float:
        """The learning rate for ``step``: linear scaling to ``global_batch`` with linear warm-up."""
        c = self.config
        if c.lr_scaling == "none":
            return c.lr
        target = c.lr * global_batch / c.base_batch_size
        if step < c.warmup_steps:
            return c.lr + (target - c.lr) * (step + 1) / c.warmup_steps
        return target

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD with this config's lr and momentum (the optimizer single-process training uses). A pipeline stage
        of parameterless layers (a ReLU) gets one empty group: torch refuses an empty parameter list."""
        import torch

        group = [{"params": list(params)}]
        return torch.optim.SGD(group, lr=self.config.lr, momentum=self.config.momentum)
