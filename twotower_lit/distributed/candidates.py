"""Softmax candidates shared by every rank: each rank's item vectors gathered, so that N processes
train the in-batch softmax that one process trains over N times the rows (the loss's
``candidates`` exchange, `twotower_lit.losses.CandidateExchange`)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

# renamed in torch 2.13 (the old names warn there); torch 2.11 and 2.12 have only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRows(torch.autograd.Function):
    """Every rank's rows of a tensor, concatenated in rank order. Backward: each rank's rows get
    the sum of the gradients that every rank's loss took for them (a reduce-scatter).

    Written here rather than taken from torch: `torch.distributed.nn.functional.all_gather` is
    deprecated from torch 2.13, and the functional collectives' differentiable gather lives in a
    private module whose entry points changed between 2.11 and 2.13. These are the plain c10d
    collectives, as the gradient averager's, which a CUDA graph can capture."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, pg: dist.ProcessGroup) -> torch.Tensor:
        ctx.pg = pg
        out = tensor.new_empty((pg.size() * tensor.shape[0], *tensor.shape[1:]))
        _all_gather(out, tensor.contiguous(), group=pg)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        out = grad.new_empty((grad.shape[0] // ctx.pg.size(), *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.pg)
        return out, None


class AllRanks:
    """The loss's candidate exchange over the default process group, looked up when first used
    (the loss is built before the strategy starts the group). Every rank's batch must have as many
    rows as every other's: the loaders' rule (`twotower_lit.data.loader`)."""

    def __init__(self, pg: Optional[dist.ProcessGroup] = None) -> None:
        self._pg = pg

    @property
    def pg(self) -> Optional[dist.ProcessGroup]:
        if self._pg is None and dist.is_available() and dist.is_initialized():
            self._pg = dist.group.WORLD
        return self._pg

    @property
    def world(self) -> int:
        return self.pg.size() if self.pg is not None else 1

    @property
    def rank(self) -> int:
        return self.pg.rank() if self.pg is not None else 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world x rows, ...): every rank's rows, with gradients back to their owners."""
        return _GatherRows.apply(tensor, self.pg) if self.world > 1 else tensor

    def gather_ids(self, tensor: torch.Tensor) -> torch.Tensor:
        """As `gather`, for tensors without gradients (item ids)."""
        if self.world == 1:
            return tensor
        out = tensor.new_empty((self.world * tensor.shape[0], *tensor.shape[1:]))
        _all_gather(out, tensor.contiguous(), group=self.pg)
        return out

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a (gradient-free) tensor over every rank, as a new tensor."""
        value = value.detach().clone()
        if self.world > 1:
            dist.all_reduce(value, group=self.pg)
        return value

    def __getstate__(self) -> dict:
        return {"_pg": None}  # (a process group does not pickle; the next use looks it up again)
