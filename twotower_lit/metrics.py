"""Retrieval metrics by full ranking, and the popularity baseline's scores.

Shared by training (validation/test), the `evaluate` entrypoint (exported model) and the
baselines, so every number in `metrics.json` is computed by the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from twotower_lit.data.csr import Csr


RETRIEVAL_METRICS = ("recall", "ndcg", "mrr", "hit_rate", "coverage", "popularity_rank")


def retrieval_names(k: int):
    """The retrieval metrics' names at cut-off `k`, in reporting order (recall@10, ...)."""
    return tuple(f"{name}@{k}" for name in RETRIEVAL_METRICS)


@dataclass
class RetrievalTotals:
    """Sums over users (so ranks can add theirs up before dividing), and how often each item index
    was recommended (catalogue coverage needs the union of the ranks' recommendations, not a sum)."""

    recall: float = 0.0
    ndcg: float = 0.0
    mrr: float = 0.0
    hits: float = 0.0  # users with at least one held-out positive in their top k
    users: int = 0
    popularity_rank: float = 0.0  # summed over recommended slots
    recommended: int = 0  # recommended slots (a user who saw nearly every item fills fewer than k)
    item_counts: Optional[np.ndarray] = None  # times each item index was recommended

    _SUMS = ("recall", "ndcg", "mrr", "hits", "users", "popularity_rank", "recommended")

    def __add__(self, other: "RetrievalTotals") -> "RetrievalTotals":
        counts = [c for c in (self.item_counts, other.item_counts) if c is not None]
        return RetrievalTotals(*(getattr(self, f) + getattr(other, f) for f in self._SUMS),
                               item_counts=sum(counts[1:], counts[0].copy()) if counts else None)

    def to_tensor(self, num_items: int) -> torch.Tensor:
        """The sums and the per-item counts as one float64 vector (one all-reduce adds the ranks' up;
        counts stay exact below 2**53)."""
        counts = self.item_counts if self.item_counts is not None else np.zeros(num_items, dtype=np.int64)
        return torch.cat([torch.tensor([float(getattr(self, f)) for f in self._SUMS], dtype=torch.float64),
                          torch.from_numpy(counts.astype(np.float64))])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "RetrievalTotals":
        values = t.double().cpu().numpy()
        n = len(cls._SUMS)
        sums = {f: (int(round(v)) if f in ("users", "recommended") else float(v))
                for f, v in zip(cls._SUMS, values[:n])}
        return cls(**sums, item_counts=np.rint(values[n:]).astype(np.int64))

    def as_dict(self, k: int) -> Dict[str, float]:
        """Means over ranked users; coverage over the real items (index 0 left out), the popularity
        rank over recommended slots (see `popularity_ranks`)."""
        n = max(self.users, 1)
        counts = self.item_counts
        coverage = float(np.count_nonzero(counts[1:])) / max(len(counts) - 1, 1) if counts is not None else 0.0
        values = (self.recall / n, self.ndcg / n, self.mrr / n, self.hits / n, coverage,
                  self.popularity_rank / max(self.recommended, 1))
        return {**dict(zip(retrieval_names(k), values)), "ranked_users": float(self.users)}


def popularity_ranks(item_counts: np.ndarray) -> np.ndarray:
    """Each item index's popularity rank: 1 + the number of real items (index >= 1) rated more
    often in training. Rank 1 is the most rated item; items rated equally often share the best
    rank of their group (1, 2, 2, 4); index 0 gets 0."""
    counts = np.asarray(item_counts, dtype=np.int64)
    real = np.sort(counts[1:])[::-1]
    ranks = 1 + np.searchsorted(-real, -counts, side="left")
    ranks[0] = 0
    return ranks


def rank_users(user_vectors: torch.Tensor, users: np.ndarray, item_vectors: torch.Tensor, seen: Csr,
               positives: Csr, k: int, chunk: int = 1024) -> RetrievalTotals:
    """Recall@k, NDCG@k, MRR@k, HitRate@k, the recommended items and their popularity ranks for
    `users`, by ranking every real item they did not see in training.

    `item_vectors` has one row per item index (row 0, the out-of-vocabulary item, is never
    ranked); score = dot product, computed on the vectors' device (a GPU ranks 200k users
    against 87k items in seconds); items of equal score are ordered as `torch.topk` returns
    them. Users without a held-out positive are not counted. Popularity is the number of
    training ratings (`seen`) of each item.
    """
    device = item_vectors.device
    num_items = item_vectors.shape[0]
    totals = RetrievalTotals(item_counts=np.zeros(num_items, dtype=np.int64))
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=device))
    item_t = item_vectors.t()
    on = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    pop_rank = on(popularity_ranks(np.bincount(seen.indices, minlength=num_items)[:num_items])).double()
    item_counts = torch.zeros(num_items, dtype=torch.int64, device=device)
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
        top_scores, top = torch.topk(scores, k=min(k, num_items), dim=1)
        # a top item is a hit when (row, item) is one of the row's held-out positives
        pos_keys = on(np.repeat(np.arange(len(u)), n_pos) * num_items + positives.items_of(u))
        row_ids = torch.arange(len(u), device=device).unsqueeze(1)
        top_hit = torch.isin(row_ids * num_items + top, pos_keys).double()
        n_pos_t = on(n_pos).double()
        totals.recall += float((top_hit.sum(1) / n_pos_t).sum())
        dcg = (top_hit * discounts[: top.shape[1]]).sum(1)
        ideal = torch.cumsum(discounts, 0)[(torch.clamp(n_pos_t, max=top.shape[1]) - 1).long()]
        totals.ndcg += float((dcg / ideal).sum())
        hit_any = top_hit.amax(1)
        first = top_hit.argmax(1).double()  # the first hit's 0-based position (0 when there is none)
        totals.mrr += float((hit_any / (first + 1)).sum())
        totals.hits += float(hit_any.sum())
        totals.users += len(u)
        # slots filled by an excluded item (seen, or index 0) when fewer than k items were left
        shown = top[torch.isfinite(top_scores)]
        item_counts += torch.bincount(shown, minlength=num_items)
        totals.popularity_rank += float(pop_rank[shown].sum())
        totals.recommended += int(shown.numel())
    totals.item_counts = item_counts.cpu().numpy()
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
