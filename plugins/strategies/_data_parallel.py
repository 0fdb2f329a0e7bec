"""What the all-reduce strategies share: replicate the model, take this rank's rows, sum gradients.

Gradients live in one flat buffer (each ``param.grad`` is a view into it, as DDP's
``gradient_as_bucket_view``), so a strategy exchanges one contiguous tensor with no copies in or out.
The last element carries this rank's loss, so the global-batch mean loss travels with the gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from fedge.plugins.strategies._host_staging import HostStage, needs_host_staging
from fedge.plugins.train.base import Strategy, batch_rows, load_sgd_state, set_lr, sgd_state

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["DataParallel", "flat_grad_buffer"]


def flat_grad_buffer(params: list[nn.Parameter], *, extra: int = 0) -> Tensor:
    """One zeroed buffer holding every parameter's gradient (set as views) plus ``extra`` trailing slots."""
    total = sum(p.numel() for p in params)
    flat = torch.zeros(total + extra, dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        # backward accumulates into an existing .grad in place, so the view stays a view.
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


class DataParallel(Strategy):
    """Replicated model; a subclass sums one flat gradient buffer across ranks in :meth:`all_reduce_`."""

    replicated: ClassVar[bool] = True
    resizable: ClassVar[bool] = True
    freezes: ClassVar[bool] = True
    recomputes: ClassVar[bool] = True
    point_to_point: ClassVar[bool] = False
    """True when :meth:`all_reduce_` uses send/recv (then CUDA tensors over gloo travel via host memory)."""

    def setup(self, model: nn.Module) -> None:
        self.model = model.to(self.ctx.device)
        self.blocks = self.control_blocks(self.model)
        self.optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.on_freeze()
        self._stage = HostStage()

    def on_freeze(self) -> None:
        """(Re)build the gradient buffer over the parameters that still train: frozen ones are not sent."""
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.flat = flat_grad_buffer(self.params, extra=1)

    def step_metrics(self) -> dict[str, float]:
        # The gradient payload each rank hands to the reduction per step (a ring puts 2(W-1)/W of it on the wire).
        return {"grad_bytes": float((self.flat.numel() - 1) * self.flat.element_size())}

    def all_reduce_(self, flat: Tensor) -> None:
        """Sum ``flat`` over all ranks, in place."""
        raise NotImplementedError

    def _sum_(self, flat: Tensor) -> None:
        if not (self.point_to_point and needs_host_staging(self.ctx.backend, flat.device)):
            self.all_reduce_(flat)
            return
        self.all_reduce_(self._stage.out(flat))
        self._stage.back(flat)

    def train_step(self, x: Tensor, y: Tensor, *, step: int) -> float:
        w, r = self.ctx.world_size, self.ctx.rank
        set_lr(self.optimizer, self.lr_at(step, x.shape[0]))
        if self.blocks.update(step):
            self.on_freeze()
        xb, yb = batch_rows(x, y, r, w)
        self.flat.zero_()
        self.model.train()
        with self.autocast():
            loss = F.cross_entropy(self.model(xb.to(self.ctx.device)), yb.to(self.ctx.device))
        loss.backward()
        self.flat[-1] = loss.detach()
        if w > 1:
            self._sum_(self.flat)
            self.flat.div_(w)  # mean of equal-sized local means = the global-batch mean
        self.optimizer.step()
        return float(self.flat[-1])

    def full_state_dict(self) -> dict[str, Tensor] | None:
        if self.ctx.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def state_for_checkpoint(self) -> dict[str, object]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict[str, object]) -> None:
        self.model.load_state_dict(state["model"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]

    def global_state(self) -> dict[str, Any]:
        return sgd_state(self.model, self.optimizer)  # every rank holds it whole

    def load_global_state(self, state: dict[str, Any], *, step: int) -> None:
        load_sgd_state(self.model, self.optimizer, state)
