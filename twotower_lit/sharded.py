"""The contract between the LightningModule and the strategy that shards it.

The module builds its model with the embedding tables on the ``meta`` device and never learns how it
is distributed. After the strategy (`twotower_lit.distributed.TorchRecStrategy`) has sharded
``module.model``, it hands the module the parameters grouped by how each is trained
(`ShardedParts`, through `ShardableModule.on_sharded`) before Lightning asks the module for its
optimizers; before a checkpoint's weights are loaded, it asks the module whether the checkpoint
holds this model (`ShardableModule.check_resumable`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Protocol, Sequence

import torch


@dataclass(frozen=True)
class ShardedParts:
    """This rank's parameters of the sharded model, by how they are trained.

    fused_optimizer: the optimizer of the sharded tables, run inside their backward pass (a
      TorchRec ``KeyedOptimizer``, empty when every table is replicated).
    replicated_tables: tables every rank holds whole (data_parallel), whose gradients are averaged
      across ranks: stepped after the backward pass with the embedding optimizer.
    dense: the towers' parameters, averaged across ranks like the replicated tables.
    zero_rows: views of row 0 of the named tables, where this rank holds it (a table split by rows
      has row 0 on one rank): zeroing them zeroes what the lookups read.
    """

    fused_optimizer: Any
    replicated_tables: Dict[str, torch.nn.Parameter]
    dense: Dict[str, torch.nn.Parameter]
    zero_rows: Callable[[Sequence[str]], List[torch.Tensor]]


class ShardableModule(Protocol):
    """What the strategy needs of a LightningModule: its ``model`` to shard, and two hooks."""

    model: torch.nn.Module

    def on_sharded(self, parts: ShardedParts) -> None:
        """Called once the model is sharded, before ``configure_optimizers``."""

    def check_resumable(self, checkpoint: Mapping[str, Any], path: str) -> None:
        """Raise a ValueError naming what differs when `checkpoint` (its trainer state, before the
        weights are loaded) holds another model than this one."""


_MEMBERS = ("model", "on_sharded", "check_resumable")


def require_shardable(module: Any) -> ShardableModule:
    """`module`, when it has every member of `ShardableModule`; else a TypeError naming those it lacks.

    Checked by name, not by a runtime-checkable protocol: from Python 3.12 `isinstance` looks a
    protocol's members up statically, which misses an nn.Module's submodules (`model` lives in
    `_modules`), so every LightningModule would be refused."""
    missing = [name for name in _MEMBERS if not hasattr(module, name)]
    if missing:
        raise TypeError(f"{type(module).__name__} does not implement twotower_lit.sharded.ShardableModule: "
                        f"it has no {', '.join(missing)}")
    return module

