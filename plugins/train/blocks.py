"""Per-block training controls every strategy shares: a layer-freezing schedule and selective activation
recomputation (the book's ch. 8 "freezing layers" and ch. 4 "recomputation").

A *block* is a top-level child of the model that holds parameters, numbered from 0 in registration order
(mlp: its Linear layers; cnn: its convolutions and dense layers; tiny-gpt: the embedding, each transformer
block, the head). The built-in models are ``nn.Sequential``, so block order is forward order.

- ``freeze``: ``first:K`` freezes blocks 0..K-1 from the start, ``first:K@S`` from step S;
  ``progressive:N`` (FreezeOut, Brock et al. 2017, as the book describes it: the first layers converge
  first, so they stop training first) freezes block 0 at step 0, block 1 at step N, ... and
  ``progressive:N@S`` starts at step S; it never freezes the last block. A frozen block gets
  ``requires_grad = False`` and no ``.grad`` (so SGD leaves it as it is and backward computes nothing for it),
  and runs its forward under ``torch.no_grad`` (its activations are not kept). Frozen blocks are always a
  prefix, so no trainable block sits before a frozen one and gradients never need to cross one.
- ``recompute``: ``all``, or block indices such as ``0,2`` or ``1-3``: each chosen block keeps only its
  input and redoes its forward in backward (``torch.utils.checkpoint``, non-reentrant).

The spec parsers here are standard-library only (the configs validate with them); :class:`BlockControl`
applies them to a model (torch).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fedge.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BlockControl", "FreezeSchedule", "model_blocks", "parse_freeze", "parse_recompute"]

_FREEZE = re.compile(r"(first|progressive):(\d+)(?:@(\d+))?")


@dataclass(frozen=True, slots=True)
class FreezeSchedule:
    """When each block stops training."""

    kind: Literal["none", "first", "progressive"] = "none"
    count: int = 0
    """``first``: how many blocks; ``progressive``: steps between one block's freezing and the next's."""
    start: int = 0
    """The step (0-based) the first block freezes at."""

    def num_frozen(self, step: int, num_blocks: int) -> int:
        """How many leading blocks are frozen during step ``step`` (0-based)."""
        if self.kind == "none" or step < self.start:
            return 0
        if self.kind == "first":
            return self.count
        return min(num_blocks - 1, 1 + (step - self.start) // self.count)


def parse_freeze(spec: str) -> FreezeSchedule:
    """``""``/``none``, ``first:K[@S]`` or ``progressive:N[@S]`` -> a schedule. Raises ValueError otherwise."""
    text = spec.strip().lower()
    if text in ("", "none"):
        return FreezeSchedule()
    m = _FREEZE.fullmatch(text)
    if not m:
        raise ValueError(
            f"freeze must be none, first:K[@STEP] or progressive:EVERY[@STEP] (e.g. first:2@100), got {spec!r}"
        )
    kind, count, start = m.group(1), int(m.group(2)), int(m.group(3) or 0)
    if count < 1:
        raise ValueError(f"freeze {spec!r}: the {'block count' if kind == 'first' else 'interval'} must be >= 1")
    return FreezeSchedule(kind, count, start)  # type: ignore[arg-type]


def parse_recompute(spec: str) -> Literal["all"] | frozenset[int]:
    """``""``/``none``/``false``, ``all``/``true``, or indices ``0,2`` and ranges ``1-3``. Raises ValueError."""
    text = spec.strip().lower()
    if text in ("", "none", "false"):
        return frozenset()
    if text in ("all", "true"):
        return "all"
    chosen: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"recompute must be none, all, or block indices like 0,2 or 1-3; got {spec!r}")
        chosen.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return frozenset(chosen)


def model_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks: its top-level children that hold parameters, as (name, module)."""
    return [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]


class BlockControl:
    """Freezing and recomputation applied to one model's blocks; the strategy calls :meth:`update` every step.

    Args:
        model: the model (or a pipeline stage holding some of its blocks under their original names).
        freeze: the ``freeze`` setting; recompute: the ``recompute`` setting.
        names: the full model's block names in order (a stage passes them; default: ``model``'s own).
    """

    def __init__(self, model: nn.Module, *, freeze: str, recompute: str, names: list[str] | None = None) -> None:
        self.schedule = parse_freeze(freeze)
        self.blocks = model_blocks(model)
        self.names = names if names is not None else [n for n, _ in self.blocks]
        total = len(self.names)
        chosen = parse_recompute(recompute)
        self.recompute = set(range(total)) if chosen == "all" else set(chosen)
        if self.recompute and max(self.recompute) >= total:
            raise ConfigError(
                f"recompute {recompute!r} names block {max(self.recompute)}, but the model has {total} blocks "
                f"(0-{total - 1}: {', '.join(self.names)})"
            )
        if self.schedule.kind == "first" and self.schedule.count >= total:
            raise ConfigError(
                f"freeze {freeze!r} would freeze all {total} blocks of the model ({', '.join(self.names)}); "
                f"freeze at most {total - 1} so something trains"
            )
        if self.schedule.kind != "none" and total < 2:
            raise ConfigError(f"freeze {freeze!r} needs a model of at least 2 blocks; this one has {total}")
        self.num_frozen = 0
        for name, block in self.blocks:
            index = self.names.index(name)
            if index in self.recompute or self.schedule.kind != "none":
                block.forward = self._controlled(index, block.forward)

    def _controlled(self, index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        import torch
        from torch.utils.checkpoint import checkpoint

        def run(*args: Any, **kwargs: Any) -> Any:
            if index < self.num_frozen:
                with torch.no_grad():  # nothing upstream trains, so no activation is kept
                    return forward(*args, **kwargs)
            if index in self.recompute and torch.is_grad_enabled():
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)

        return run

    def update(self, step: int) -> bool:
        """Freeze the blocks due by ``step``; True when the frozen set grew (the strategy then rebuilds what it
        communicates)."""
        due = self.schedule.num_frozen(step, len(self.names))
        if due <= self.num_frozen:
            return False
        self.num_frozen = due
        for p in self.frozen_parameters():
            p.requires_grad_(False)
            p.grad = None
        return True

    def frozen_parameters(self) -> list[nn.Parameter]:
        """This model's parameters in frozen blocks, in parameter order."""
        return [p for name, b in self.blocks if self.names.index(name) < self.num_frozen for p in b.parameters()]
