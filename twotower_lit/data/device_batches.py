"""Training batches assembled on the accelerator from a copy of the training split kept there
(``--data-on-device``).

Why: at GPU step rates (a 64k-row step takes ~5 ms) the streaming loader has to deliver over
10 M rows/s through worker processes, shared memory, pinning and a host-to-device copy per
batch, and it does not (about 4.4 M rows/s end to end on an H200 machine with 12 workers,
against 11 M rows/s for the same steps fed from memory; see the README's GPU tables). When the
training split fits in device memory (20 bytes per rating: ~0.5 GB for 25 M training rows, plus
the small feature tables), this reader keeps it there and builds every batch with a few gathers
on the device: no workers, no copies, no host sync (each key's length is computed on the host
for the whole epoch at once, on the device).

Which rows a rank trains on is the streaming loader's policy (`assign_rows`: the same number of
rows on every rank, the same wrap-around re-read, the same number of batches). Within the rank's
rows the order is one seeded permutation per epoch (seed, epoch, rank; drawn by the device's own
generator, so a CPU and a GPU run see different orders) instead of a shuffle buffer, so the
batches are not those of the streaming loader. Sampled negatives are not built
here: use the streaming loader for ``--negatives N``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset

from twotower_lit.data.batches import Batch, KJTBuilder, keyed_features
from twotower_lit.data.loader import assign_rows, num_batches
from twotower_lit.data.schema import MULTI_VALUED


class DeviceResidentBatches(IterableDataset):
    """This rank's training batches, assembled on `device` from the whole split held there.

    `rows` holds the split's ``user``, ``item`` and ``label`` columns in shard order (as
    `read_split` returns them) and `shard_rows` the row count of each shard.
    """

    def __init__(self, rows: Dict[str, np.ndarray], shard_rows: Sequence[int], builder: KJTBuilder,
                 batch_size: int, world: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 device: torch.device = torch.device("cpu")) -> None:
        self.shard_rows = [int(r) for r in shard_rows]
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        if int(self.offsets[-1]) != len(rows["user"]):
            raise ValueError(f"the split has {len(rows['user'])} rows but its shards list {int(self.offsets[-1])}")
        self.builder = builder
        self.batch_size = batch_size
        self.world, self.rank, self.seed, self.shuffle = world, rank, seed, shuffle
        self.device = device
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained on (resuming mid-epoch)

        def on_device(a: np.ndarray, dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device)

        self.users = on_device(rows["user"], np.int64)
        self.items = on_device(rows["item"], np.int64)
        self.labels = on_device(rows["label"], np.float32)
        tables = builder.tables
        self.user_tables = {n: on_device(tables.user[n], np.int64) for n in builder.user_features}
        self.item_tables = {n: on_device(tables.item[n], np.int64) for n in builder.item_features
                            if n not in MULTI_VALUED}
        self.multi = [n for n in builder.item_features if n in MULTI_VALUED]
        if len(self.multi) > 1:
            raise ValueError(f"one multi-valued item feature is supported, got {self.multi}")
        if self.multi:
            self.multi_indptr = on_device(tables.genres_indptr, np.int64)
            self.multi_values = on_device(tables.genres_values, np.int64)
            self.multi_lengths = torch.diff(self.multi_indptr)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return num_batches(int(self.offsets[-1]), self.world, self.batch_size)

    def epoch_rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(row indices into the split, read-for-the-first-time flags) of this rank, in training
        order, on the device (permuting tens of millions of rows there takes milliseconds)."""
        segments = assign_rows(self.shard_rows, self.world, self.rank, self.seed, self.epoch, self.shuffle)
        dev = self.device
        index = torch.cat([torch.arange(int(self.offsets[s] + lo), int(self.offsets[s] + hi), device=dev)
                           for s, lo, hi, _ in segments] or [torch.zeros(0, dtype=torch.int64, device=dev)])
        first = torch.cat([torch.full((hi - lo,), not wrapped, dtype=torch.bool, device=dev)
                           for _, lo, hi, wrapped in segments] or [torch.zeros(0, dtype=torch.bool, device=dev)])
        if self.shuffle:
            generator = torch.Generator(device=dev)
            generator.manual_seed(int(np.random.default_rng([self.seed, self.epoch, self.rank, 0xD0]).integers(2**62)))
            order = torch.randperm(len(index), generator=generator, device=dev)
            index, first = index[order], first[order]
        return index, first

    def __iter__(self):
        index, first = self.epoch_rows()
        starts = list(range(0, len(index), self.batch_size))
        multi_totals: List[int] = []
        if self.multi and len(index):
            # each batch's multi-valued length, for the whole epoch in one device-to-host copy
            ends = torch.cumsum(self.multi_lengths[self.items[index]], 0)
            bounds = torch.tensor([min(lo + self.batch_size, len(index)) - 1 for lo in starts], device=self.device)
            cut = ends[bounds]
            multi_totals = torch.diff(cut, prepend=cut.new_zeros(1)).tolist()
        for b, lo in enumerate(starts):
            if b < self.skip:
                continue
            rows = index[lo:lo + self.batch_size]
            yield self._batch(rows, first[lo:lo + self.batch_size], multi_totals[b] if self.multi else 0)

    def _batch(self, rows: torch.Tensor, first: torch.Tensor, multi_total: int) -> Batch:
        """The same KeyedJaggedTensor as `KJTBuilder.build` for these rows, gathered on the device."""
        users, items = self.users[rows], self.items[rows]
        n = len(rows)
        ones = torch.ones(n, dtype=torch.int32, device=self.device)
        values: List[torch.Tensor] = [self.user_tables[name][users] for name in self.builder.user_features]
        lengths: List[torch.Tensor] = [ones] * len(values)
        for name in self.builder.item_features:
            if name in MULTI_VALUED:
                starts = self.multi_indptr[items]
                lens = self.multi_indptr[items + 1] - starts
                # positions of every selected item's values: concat of arange(start, start + len)
                shift = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens, output_size=multi_total)
                values.append(self.multi_values[torch.arange(multi_total, device=self.device) + shift])
                lengths.append(lens.to(torch.int32))
            else:
                values.append(self.item_tables[name][items])
                lengths.append(ones)
        features = keyed_features(self.builder.keys, values, lengths)
        return Batch(features, self.labels[rows], first)
