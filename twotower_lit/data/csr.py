"""Compressed per-user item lists (CSR) and vectorised range helpers (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for every (s, l), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    offsets = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + offsets


@dataclass
class Csr:
    """Per-user item lists: items of user u are ``indices[indptr[u]:indptr[u + 1]]``."""

    indptr: np.ndarray
    indices: np.ndarray

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, num_users: int) -> "Csr":
        """The item lists of (user, item) pairs, each list sorted (duplicates kept).

        One sort of ``user * items + item`` keys instead of ``np.lexsort((items, users))``: the
        same order, 5x faster (25.6 M pairs, the training split of 32 M ratings: 2.4 s against
        12.4 s on a 2-core VM), and the training job builds this for its whole training split
        before it starts."""
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        counts = np.bincount(users, minlength=num_users)
        indptr = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        width = int(items.max()) + 1 if len(items) else 1
        if num_users * width >= 2 ** 62:  # keys would overflow int64
            return cls(indptr, items[np.lexsort((items, users))])
        keys = users * width + items
        keys.sort()
        return cls(indptr, keys % width)

    def keys(self, num_items: int) -> np.ndarray:
        """Sorted ``user * num_items + item`` of every pair (for membership tests)."""
        users = np.repeat(np.arange(len(self.indptr) - 1, dtype=np.int64), np.diff(self.indptr))
        return np.sort(users * num_items + self.indices)

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def items_of(self, users: np.ndarray) -> np.ndarray:
        """Concatenated item lists of `users`, in order."""
        starts = self.indptr[users]
        return self.indices[concat_ranges(starts, self.indptr[users + 1] - starts)]


def positives_csr(users: np.ndarray, items: np.ndarray, labels: np.ndarray, num_users: int) -> Csr:
    """The liked items (label 1) of each user of a split's rows."""
    pos = labels > 0.5
    return Csr.from_pairs(users[pos], items[pos], num_users)
