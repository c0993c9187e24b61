"""Sampled negatives: unrated items drawn for each rated row, uniformly or by smoothed training
popularity, and the probabilities the softmax corrects them by."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def negative_probabilities(num_items: int, mode: str = "uniform", item_counts: Optional[np.ndarray] = None,
                           power: float = 1.0) -> np.ndarray:
    """Each item's probability of being drawn as a sampled negative (before the user's own rated
    items are rejected): uniform over the real items, or by training popularity raised to `power`
    (below 1 it flattens toward uniform, as word2vec's 0.75 does). Never item 0, the
    out-of-vocabulary row. The loss corrects the softmax's logits by the same probabilities."""
    if mode == "uniform":
        p = np.full(num_items, 1.0 / max(num_items - 1, 1))
    elif mode == "popularity":
        if item_counts is None or len(item_counts) != num_items:
            raise ValueError(f"popularity sampling needs the training count of each of the {num_items} items")
        if not power > 0:
            raise ValueError(f"the popularity power must be > 0 (1: by popularity; 0.5: smoothed), got {power}")
        # an item never rated in training keeps a small chance, as the softmax's half count does
        p = np.maximum(np.asarray(item_counts, dtype=np.float64), 0.5) ** power
    else:
        raise ValueError(f"negative_sampling must be 'uniform' or 'popularity', got {mode!r}")
    p[0] = 0.0
    return p / p.sum()


class NegativeSampler:
    """Draws items a user has not rated in training, uniformly or by training popularity.

    Membership of (user, item) in the training pairs is a bit lookup when the user x item grid
    fits in `max_bitset_bytes` (random reads into a few MB stay in cache: ~10x faster than binary
    search), else a binary search over the sorted pair keys.
    """

    def __init__(self, seen_keys: np.ndarray, num_items: int, mode: str = "uniform",
                 item_counts: Optional[np.ndarray] = None, max_bitset_bytes: int = 256 << 20,
                 power: float = 1.0) -> None:
        self.seen_keys = seen_keys  # sorted user * num_items + item of every training pair
        self.num_items = num_items
        grid = int(seen_keys[-1]) + 1 if len(seen_keys) else 0
        self.bits = None
        if 0 < grid <= max_bitset_bytes * 8:
            self.bits = np.zeros((grid + 7) // 8, dtype=np.uint8)
            np.bitwise_or.at(self.bits, seen_keys >> 3, (1 << (seen_keys & 7)).astype(np.uint8))
        p = negative_probabilities(num_items, mode, item_counts, power)
        self.cdf = np.cumsum(p) if mode == "popularity" else None  # (uniform: integers drawn directly)

    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.cdf is None:
            return rng.integers(1, self.num_items, size=n)
        return np.minimum(np.searchsorted(self.cdf, rng.random(n), side="right"), self.num_items - 1)

    def is_seen(self, keys: np.ndarray) -> np.ndarray:
        if self.bits is not None:
            inside = keys < len(self.bits) * 8
            k = np.where(inside, keys, 0)
            return inside & ((self.bits[k >> 3] >> (k & 7).astype(np.uint8)) & 1).astype(bool)
        pos = np.searchsorted(self.seen_keys, keys)
        return (pos < len(self.seen_keys)) & (self.seen_keys[np.minimum(pos, len(self.seen_keys) - 1)] == keys)

    def sample(self, users: np.ndarray, per_row: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """`per_row` unrated items for every user in `users`: returns (users repeated, items)."""
        u = np.repeat(users.astype(np.int64), per_row)
        items = self._draw(len(u), rng)
        todo = np.arange(len(u)) if len(self.seen_keys) else np.zeros(0, dtype=np.int64)
        for _ in range(100):  # rejection sampling; collisions fall geometrically
            todo = todo[self.is_seen(u[todo] * self.num_items + items[todo])]
            if len(todo) == 0:
                break
            items[todo] = self._draw(len(todo), rng)
        return u, items
