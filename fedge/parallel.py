"""The parallel layout of a job: how many ways it splits data (dp), layers' insides (tp) and layers (pp).

One validated object, framework-free, that model-parallel strategies build their process groups from.
Ranks are laid out pp-major, tp-minor (Megatron-LM's order: tensor-parallel peers are neighbours, so on
a GPU node they share the fastest links)::

    rank = (pp_index * dp + dp_index) * tp + tp_index

Example::

    dims = ParallelDims(dp=2, tp=2, pp=1, world_size=4)
    dims.coords(3)               # {MeshAxis.PP: 0, MeshAxis.DP: 1, MeshAxis.TP: 1}
    dims.groups(MeshAxis.TP)     # [[0, 1], [2, 3]]
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fedge.errors import ConfigError

__all__ = ["MeshAxis", "ParallelDims"]


class MeshAxis(StrEnum):
    """The axes of the device mesh, outermost first."""

    PP = "pp"
    DP = "dp"
    TP = "tp"


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelDims:
    """A dp x tp x pp layout, checked against the world size when one is given.

    Raises:
        ConfigError: a factor is below 1, or dp * tp * pp differs from ``world_size``
            (the message lists every factor).
    """

    dp: int = 1
    """Data-parallel replicas (each sees its own rows of the global batch)."""
    tp: int = 1
    """Tensor-parallel shards of each layer."""
    pp: int = 1
    """Pipeline stages."""
    world_size: int | None = None
    """Processes in the job; None skips the product check."""

    def __post_init__(self) -> None:
        bad = [f"{a}={getattr(self, a)}" for a in ("dp", "tp", "pp") if getattr(self, a) < 1]
        if bad:
            raise ConfigError(f"parallel sizes must be >= 1; got {', '.join(bad)}")
        if self.world_size is not None and self.product != self.world_size:
            raise ConfigError(
                f"parallel layout dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.product} does not equal "
                f"the world size {self.world_size}; choose dp, tp and pp whose product is {self.world_size}"
            )

    @classmethod
    def infer_dp(cls, *, world_size: int, tp: int = 1, pp: int = 1) -> ParallelDims:
        """The layout with dp = world_size / (tp * pp).

        Raises:
            ConfigError: tp * pp does not divide the world size.
        """
        if tp < 1 or pp < 1 or world_size % (tp * pp):
            raise ConfigError(
                f"tp={tp} x pp={pp} = {tp * pp} does not divide the world size {world_size}; "
                f"choose tp and pp whose product divides {world_size}"
            )
        return cls(dp=world_size // (tp * pp), tp=tp, pp=pp, world_size=world_size)

    @property
    def product(self) -> int:
        return self.dp * self.tp * self.pp

    def size(self, axis: MeshAxis) -> int:
        """The number of ranks along ``axis``."""
        return int(getattr(self, MeshAxis(axis).value))

    def coords(self, rank: int) -> dict[MeshAxis, int]:
        """Where ``rank`` sits on each axis."""
        if not 0 <= rank < self.product:
            raise ValueError(f"rank {rank} is outside the layout of {self.product} ranks")
        return {
            MeshAxis.PP: rank // (self.dp * self.tp),
            MeshAxis.DP: rank // self.tp % self.dp,
            MeshAxis.TP: rank % self.tp,
        }

    def rank_of(self, *, pp: int = 0, dp: int = 0, tp: int = 0) -> int:
        """The rank at the given coordinates."""
        return (pp * self.dp + dp) * self.tp + tp

    def groups(self, axis: MeshAxis) -> list[list[int]]:
        """Every group of ranks that differ only along ``axis``, each sorted by its ``axis`` index.

        Every rank must create every group (``torch.distributed.new_group`` is collective), in this order.
        """
        axis = MeshAxis(axis)
        others = [a for a in MeshAxis if a is not axis]
        out = []
        for i in range(self.size(others[0])):
            for j in range(self.size(others[1])):
                fixed = {others[0].value: i, others[1].value: j}
                out.append([self.rank_of(**fixed, **{axis.value: k}) for k in range(self.size(axis))])
        return out

    def group_of(self, rank: int, axis: MeshAxis) -> list[int]:
        """The ranks that share every coordinate of ``rank`` except ``axis``."""
        c = self.coords(rank)
        axis = MeshAxis(axis)
        fixed = {a.value: i for a, i in c.items() if a is not axis}
        return [self.rank_of(**fixed, **{axis.value: k}) for k in range(self.size(axis))]

    def __str__(self) -> str:
        return f"dp={self.dp} x tp={self.tp} x pp={self.pp}"
