"""Vectorised batch assembly: index arrays -> TorchRec `KeyedJaggedTensor` batches.

No per-row Python: side features are gathered from the user/item feature tables with numpy
fancy indexing, and the jagged genres feature is built from a CSR (indptr/indices) layout.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from twotower_lit.data.csr import concat_ranges
from twotower_lit.data.schema import MULTI_VALUED


@dataclass
class Batch(Pipelineable):
    """Features of every row plus its label; movable as one unit (Lightning, TorchRec pipelines)."""

    features: KeyedJaggedTensor
    labels: torch.Tensor
    rated: torch.Tensor  # bool: True for rated rows, False for sampled negatives

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        device = torch.device(device)
        if self.labels.device == device and self.rated.device == device and self.features.device() == device:
            return self  # built on the device already (--data-on-device): no new KeyedJaggedTensor per step
        return Batch(self.features.to(device=device, non_blocking=non_blocking),
                     self.labels.to(device=device, non_blocking=non_blocking),
                     self.rated.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        self.labels.record_stream(stream)
        self.rated.record_stream(stream)

    def pin_memory(self) -> "Batch":
        # KeyedJaggedTensor has no pin method in every TorchRec version: rebuild it from pinned parts,
        # keeping the per-key lengths computed on the host (see keyed_features)
        kjt = self.features
        pinned = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().pin_memory(),
                                   lengths=kjt.lengths().pin_memory(), stride=kjt.stride(),
                                   length_per_key=kjt.length_per_key_or_none(),
                                   offset_per_key=kjt.offset_per_key_or_none())
        return Batch(pinned, self.labels.pin_memory(), self.rated.pin_memory())

    def __len__(self) -> int:
        return int(self.labels.numel())


class FeatureTables:
    """User and item side features as dense arrays indexed by user/item index.

    ``user[name]`` / ``item[name]`` are int arrays of length vocab_size("user"/"item"); the jagged
    item feature ``genres`` is kept as CSR (``genres_indptr``, ``genres_values``).
    """

    def __init__(self, users: Mapping[str, np.ndarray], items: Mapping[str, np.ndarray],
                 genres_indptr: Optional[np.ndarray], genres_values: Optional[np.ndarray]) -> None:
        self.user = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in users.items()}
        self.item = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in items.items()}
        self.genres_indptr = None if genres_indptr is None else genres_indptr.astype(np.int64)
        self.genres_values = None if genres_values is None else genres_values.astype(np.int64)

    @classmethod
    def from_frames(cls, users_table, items_table, num_users: int, num_items: int,
                    user_features: Sequence[str], item_features: Sequence[str]) -> "FeatureTables":
        """Build from the prepared users/items Arrow tables (rows may come in any order)."""
        users = {"user": np.arange(num_users, dtype=np.int64)}
        uidx = users_table.column("user").to_numpy()
        for name in user_features:
            if name != "user":
                arr = np.zeros(num_users, dtype=np.int64)
                arr[uidx] = users_table.column(name).to_numpy()
                users[name] = arr
        items = {"item": np.arange(num_items, dtype=np.int64)}
        items_table = items_table.sort_by("item")  # so the flattened genre lists are in index order
        iidx = items_table.column("item").to_numpy()
        indptr = values = None
        for name in item_features:
            if name == "item":
                continue
            if name in MULTI_VALUED:
                col = items_table.column(name).combine_chunks()
                lengths = np.zeros(num_items, dtype=np.int64)
                lengths[iidx] = col.value_lengths().fill_null(0).to_numpy()
                indptr = np.zeros(num_items + 1, dtype=np.int64)
                np.cumsum(lengths, out=indptr[1:])
                values = col.flatten().to_numpy()
            else:
                arr = np.zeros(num_items, dtype=np.int64)
                arr[iidx] = items_table.column(name).to_numpy()
                items[name] = arr
        return cls(users, items, indptr, values)


def keyed_features(keys: Sequence[str], values: Sequence[torch.Tensor],
                   lengths: Sequence[torch.Tensor]) -> KeyedJaggedTensor:
    """One `KeyedJaggedTensor` from each key's values and per-row lengths (all keys have the same
    rows). Each key's total length is known here, from the pieces' sizes, and handed over:
    computed later from device lengths, it would cost a device-to-host sync in every split or
    permute of the sharded model's input distribution."""
    per_key = [len(v) for v in values]
    return KeyedJaggedTensor(keys=list(keys), values=torch.cat(list(values)), lengths=torch.cat(list(lengths)),
                             stride=len(lengths[0]), length_per_key=per_key,
                             offset_per_key=[0, *itertools.accumulate(per_key)])


class KJTBuilder:
    """Turns (user index, item index) arrays into one `KeyedJaggedTensor` with every feature."""

    def __init__(self, tables: FeatureTables, user_features: Sequence[str], item_features: Sequence[str]) -> None:
        self.tables = tables
        self.user_features = list(user_features)
        self.item_features = list(item_features)
        self.keys: List[str] = self.user_features + self.item_features

    def build(self, users: np.ndarray, items: np.ndarray) -> KeyedJaggedTensor:
        n = len(users)
        values: List[np.ndarray] = []
        lengths: List[np.ndarray] = []
        ones = np.ones(n, dtype=np.int32)
        for name in self.user_features:
            values.append(self.tables.user[name][users])
            lengths.append(ones)
        for name in self.item_features:
            if name in MULTI_VALUED:
                t = self.tables
                starts = t.genres_indptr[items]
                lens = t.genres_indptr[items + 1] - starts
                values.append(t.genres_values[concat_ranges(starts, lens)])
                lengths.append(lens.astype(np.int32))
            else:
                values.append(self.tables.item[name][items])
                lengths.append(ones)
        return keyed_features(self.keys, [torch.from_numpy(v) for v in values],
                              [torch.from_numpy(x) for x in lengths])

    def batch(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray,
              rated: Optional[np.ndarray] = None) -> Batch:
        if rated is None:
            rated = np.ones(len(users), dtype=bool)
        return Batch(self.build(users, items), torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
                     torch.from_numpy(np.ascontiguousarray(rated, dtype=bool)))
