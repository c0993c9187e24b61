"""Retrieval metrics by full ranking, and the popularity baseline's scores.

Shared by training (validation/test), the `evaluate` entrypoint (exported model) and the
baselines, so every number in `metrics.json` is computed by the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from twotower_lit.data.csr import Csr


@dataclass
class RetrievalTotals:
    """Sums over users (so ranks can add theirs up before dividing)."""

    recall: float = 0.0
    ndcg: float = 0.0
    users: int = 0

    def __add__(self, other: "RetrievalTotals") -> "RetrievalTotals":
        return RetrievalTotals(self.recall + other.recall, self.ndcg + other.ndcg, self.users + other.users)

    def as_dict(self, k: int) -> Dict[str, float]:
        n = max(self.users, 1)
        return {f"recall@{k}": self.recall / n, f"ndcg@{k}": self.ndcg / n, "ranked_users": float(self.users)}


def rank_users(user_vectors: torch.Tensor, users: np.ndarray, item_vectors: torch.Tensor, seen: Csr,
               positives: Csr, k: int, chunk: int = 1024) -> RetrievalTotals:
    """Recall@k and NDCG@k for `users` by ranking every real item they did not see in training.

    `item_vectors` has one row per item index (row 0, the out-of-vocabulary item, is never
    ranked); score = dot product, computed on the vectors' device (a GPU ranks 200k users
    against 87k items in seconds). Users without a held-out positive are not counted.
    """
    totals = RetrievalTotals()
    device = item_vectors.device
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=device))
    item_t = item_vectors.t()
    num_items = item_vectors.shape[0]
    on = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    for lo in range(0, len(users), chunk):
        u = users[lo:lo + chunk]
        n_pos = positives.lengths()[u]
        keep = n_pos > 0
        if not keep.any():
            continue
        u, n_pos = u[keep], n_pos[keep]
        scores = user_vectors[lo:lo + chunk][on(keep)].to(device) @ item_t
        scores[:, 0] = -math.inf
        scores[on(np.repeat(np.arange(len(u)), seen.lengths()[u])), on(seen.items_of(u))] = -math.inf
        top = torch.topk(scores, k=min(k, num_items), dim=1).indices
        # a top item is a hit when (row, item) is one of the row's held-out positives
        pos_keys = on(np.repeat(np.arange(len(u)), n_pos) * num_items + positives.items_of(u))
        row_ids = torch.arange(len(u), device=device).unsqueeze(1)
        top_hit = torch.isin(row_ids * num_items + top, pos_keys).double()
        n_pos_t = on(n_pos).double()
        totals.recall += float((top_hit.sum(1) / n_pos_t).sum())
        dcg = (top_hit * discounts[: top.shape[1]]).sum(1)
        ideal = torch.cumsum(discounts, 0)[(torch.clamp(n_pos_t, max=top.shape[1]) - 1).long()]
        totals.ndcg += float((dcg / ideal).sum())
        totals.users += len(u)
    return totals


def binary_metrics(probs: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """AUC, log-loss and accuracy of probabilities (torchmetrics, the same as during training)."""
    from torchmetrics.functional.classification import binary_accuracy, binary_auroc

    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    eps = 1e-7
    pc = p.clamp(eps, 1 - eps)
    logloss = float(-(y * pc.log() + (1 - y) * (1 - pc).log()).mean())
    return {"auc": float(binary_auroc(p, y)), "logloss": logloss, "accuracy": float(binary_accuracy(p, y))}


class PopularityBaseline:
    """The no-personalisation reference model.

    Retrieval ranks items by how often they were rated in training (popularity); the probability
    that a rated pair is liked is the item's training positive rate, shrunk towards the global
    rate with the weight of `prior_strength` ratings (so rarely rated items are not 0 or 1).
    """

    def __init__(self, train_items: np.ndarray, train_labels: np.ndarray, num_items: int,
                 prior_strength: float = 10.0) -> None:
        self.counts = np.bincount(train_items, minlength=num_items).astype(np.float64)
        positives = np.bincount(train_items, weights=train_labels, minlength=num_items)
        prior = float(np.mean(train_labels)) if len(train_labels) else 0.5
        self.rate = (positives + prior_strength * prior) / (self.counts + prior_strength)

    def probability(self, items: np.ndarray) -> np.ndarray:
        return self.rate[items]

    def item_vectors(self) -> torch.Tensor:
        return torch.from_numpy(self.counts).float().unsqueeze(1)

    def evaluate(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray, seen: Csr, positives: Csr,
                 k: int, device: torch.device = torch.device("cpu")) -> Dict[str, float]:
        out = binary_metrics(self.probability(items), labels)
        rank_u = np.unique(users)
        totals = rank_users(torch.ones(len(rank_u), 1, device=device), rank_u, self.item_vectors().to(device),
                            seen, positives, k)
        out.update(totals.as_dict(k))
        return out
