"""Full-ranking retrieval evaluation inside a (possibly sharded) training run.

Tower vectors are computed collectively: every rank embeds an equal-sized slice of the items
and users (DMP's collectives need the same number of forward calls on every rank), the item
vectors are all-gathered, each rank ranks its own users, and the sums are all-reduced, so the
figures equal a single-process evaluation of the same model.
"""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from twotower_lit.data.batches import KJTBuilder
from twotower_lit.data.csr import Csr
from twotower_lit.metrics import RetrievalTotals, rank_users


def metric_key(name: str) -> str:
    """MLflow metric names cannot hold '@': recall@10 is logged as recall_at_10."""
    return name.replace("@", "_at_")


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def tower_matrix(module, builder: KJTBuilder, ids: np.ndarray, tower: str, batch_size: int,
                 device: torch.device, gather: bool = True) -> torch.Tensor:
    """Vectors of `ids` through the user or item tower.

    With `gather`, each rank embeds ``ceil(len(ids) / world)`` ids (padded with index 0) and the
    result, identical on every rank, has one row per id. Without it, the rank's own slice is
    returned (``ids[rank * per:(rank + 1) * per]``). Vectors stay on `device`.
    """
    world, rank = _world()
    per = math.ceil(len(ids) / world)
    mine = np.zeros(per, dtype=np.int64)
    chunk = ids[rank * per:(rank + 1) * per]
    mine[: len(chunk)] = chunk
    zeros = np.zeros(batch_size, dtype=np.int64)
    out = []
    for lo in range(0, per, batch_size):
        part = mine[lo:lo + batch_size]
        other = zeros[: len(part)]
        users, items = (part, other) if tower == "user" else (other, part)
        kjt = builder.build(users, items).to(device)
        u, i = module.tower_vectors_from_features(kjt)
        out.append((u if tower == "user" else i).float())
    vectors = torch.cat(out) if out else torch.zeros(0, device=device)
    if not gather:
        return vectors[: len(chunk)]
    if world > 1:
        parts = [torch.empty_like(vectors) for _ in range(world)]
        dist.all_gather(parts, vectors.contiguous())
        vectors = torch.cat(parts)
    return vectors[: len(ids)]


def evaluate_retrieval(module, builder: KJTBuilder, num_items: int, users: np.ndarray, seen: Csr,
                       positives: Csr, k: int, batch_size: int, device: torch.device) -> RetrievalTotals:
    """The retrieval metrics (`rank_users`) over `users` (all ranks call this with the same arguments)."""
    items = tower_matrix(module, builder, np.arange(num_items, dtype=np.int64), "item", batch_size, device)
    world, rank = _world()
    per = math.ceil(len(users) / world)
    mine = users[rank * per:(rank + 1) * per]
    user_vecs = tower_matrix(module, builder, users, "user", batch_size, device, gather=False)
    totals = rank_users(user_vecs, mine, items, seen, positives, k)
    if world > 1:
        # the per-item counts are summed too: coverage counts an item any rank recommended once
        t = totals.to_tensor(num_items)
        if device.type == "cuda":
            t = t.to(device)
        dist.all_reduce(t)
        totals = RetrievalTotals.from_tensor(t)
    return totals


class RetrievalEvaluation(L.Callback):
    """Logs ``{stage}_recall_at_k``, ``{stage}_ndcg_at_k`` and the other retrieval metrics
    (`twotower_lit.metrics.retrieval_names`) after each validation and at test."""

    def __init__(self, k: int = 10, batch_size: int = 8192) -> None:
        self.k = k
        self.batch_size = batch_size
        self.last: dict = {}

    def _run(self, trainer: L.Trainer, module, split: str) -> None:
        dm = trainer.datamodule
        positives = dm.positives[split]
        users = np.flatnonzero(positives.lengths() > 0).astype(np.int64)
        module.eval()
        totals = evaluate_retrieval(module, dm.builder, dm.num_items, users, dm.seen, positives, self.k,
                                    self.batch_size, module.device)
        values = totals.as_dict(self.k)
        self.last[split] = values
        stage = "test" if split == "test" else "val"
        module.log_dict({metric_key(f"{stage}_{name}"): v for name, v in values.items() if name != "ranked_users"},
                        prog_bar=False, sync_dist=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, module) -> None:
        if not trainer.sanity_checking:
            self._run(trainer, module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, module) -> None:
        self._run(trainer, module, "test")
