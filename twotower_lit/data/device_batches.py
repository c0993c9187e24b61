"""Training batches assembled on the accelerator from a copy of the training split kept there
(``--data-on-device``).

Why: at GPU step rates the streaming loader has to deliver tens of millions of rows per second
through worker processes, shared memory, pinning and a host-to-device copy per batch, and it does
not keep up (`benchmarks/GPU_RESULTS.md` has the figures). When the training split fits in device
memory (20 bytes per rating: ~0.5 GB for 25 M training rows, plus
the small feature tables), this reader keeps it there and builds the batches with a few gathers
on the device, many batches at a time: no workers, no copies, no host sync (each key's length is
computed on the host for the whole epoch at once, on the device).

Which rows a rank trains on is the streaming loader's policy (`assign_rows`: the same number of
rows on every rank, the same wrap-around re-read, the same number of batches, the same rule for
resuming an epoch on another layout). Within the rank's
rows the order is one seeded permutation per epoch (seed, epoch, rank; drawn by the device's own
generator, so a CPU and a GPU run see different orders) instead of a shuffle buffer, so the
batches are not those of the streaming loader. Sampled negatives are not built
here: use the streaming loader for ``--negatives N``.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_lit.data.batches import Batch, KJTBuilder
from twotower_lit.data.loader import EpochSequence, ResumableEpoch, num_batches
from twotower_lit.data.schema import MULTI_VALUED

CHUNK_ROWS = 1 << 20  # rows assembled at once (see DeviceResidentBatches)


def ranges(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """The concatenation of ``arange(start, start + length)`` for each pair (`total`: their sum),
    in a few operations however many pairs there are."""
    shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift


class DeviceResidentBatches(ResumableEpoch, IterableDataset):
    """This rank's training batches, assembled on `device` from the whole split held there.

    `rows` holds the split's ``user``, ``item`` and ``label`` columns in shard order (as
    `read_split` returns them) and `shard_rows` the row count of each shard.

    Batches are assembled `chunk_rows` rows (whole batches) at a time: a few gathers build every
    feature of a chunk's batches at once, and each batch is then views of the chunk plus at most
    one concatenation. At GPU step rates the training loop is bound by the host's per-operation
    work, so the ~25 small operations of building one batch on its own would run on every step.
    """

    def __init__(self, rows: Dict[str, np.ndarray], shard_rows: Sequence[int], builder: KJTBuilder,
                 batch_size: int, world: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 device: torch.device = torch.device("cpu"), chunk_rows: int = CHUNK_ROWS) -> None:
        self.shard_rows = [int(r) for r in shard_rows]
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        if int(self.offsets[-1]) != len(rows["user"]):
            raise ValueError(f"the split has {len(rows['user'])} rows but its shards list {int(self.offsets[-1])}")
        self.builder = builder
        self.batch_size = batch_size
        self.batches_per_chunk = max(1, chunk_rows // batch_size)
        self.world, self.rank, self.seed, self.shuffle = world, rank, seed, shuffle
        self.device = device
        self.epoch = 0

        def on_device(a: np.ndarray, dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device)

        self.users = on_device(rows["user"], np.int64)
        self.items = on_device(rows["item"], np.int64)
        self.labels = on_device(rows["label"], np.float32)
        tables = builder.tables
        self.multi = [n for n in builder.item_features if n in MULTI_VALUED]
        if len(self.multi) > 1:
            raise ValueError(f"one multi-valued item feature is supported, got {self.multi}")
        single_items = [n for n in builder.item_features if n not in MULTI_VALUED]
        # each tower's single-valued features as the columns of one table: one gather per tower
        self.user_columns = on_device(np.stack([tables.user[n] for n in builder.user_features], 1), np.int64)
        self.item_columns = on_device(np.stack([tables.item[n] for n in single_items], 1), np.int64)
        # the multi-valued feature's place among the keys (the single-valued keys keep their order around it)
        self.multi_key = builder.keys.index(self.multi[0]) if self.multi else None
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
        segments = self.segments(self.world, self.rank, self.remaining)
        dev, total = self.device, segments.rows
        lengths = torch.from_numpy(segments.hi - segments.lo).to(dev)
        index = ranges(torch.from_numpy(self.offsets[segments.shard] + segments.lo).to(dev), lengths, total)
        first = torch.repeat_interleave(torch.from_numpy(~segments.wrapped).to(dev), lengths, output_size=total)
        order = self._order(total, self.rank)
        if order is not None:
            index, first = index[order], first[order]
        return index, first

    def _order(self, rows: int, rank: int) -> Optional[torch.Tensor]:
        """The permutation of `rank`'s rows this epoch, drawn on the device (None without shuffling)."""
        if not self.shuffle:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(np.random.default_rng([self.seed, self.epoch, rank, 0xD0]).integers(2**62)))
        return torch.randperm(rows, generator=generator, device=self.device)

    def trained_positions(self, remaining: Optional[np.ndarray], world: int, rank: int, batch_size: int,
                          batches: int) -> np.ndarray:
        positions = EpochSequence(self.shard_rows, self.seed, self.epoch, self.shuffle).positions(
            self.segments(world, rank, remaining))
        order = self._order(len(positions), rank)
        if order is not None:
            positions = positions[order.cpu().numpy()]
        return positions[:batches * batch_size]

    def __iter__(self):
        index, first = self.epoch_rows()
        size, n = self.batch_size, len(index)
        full = n // size  # batches of batch_size rows; a shorter last one follows when n is not a multiple
        multi_totals: List[int] = []
        if self.multi and n:
            # each batch's multi-valued length, for the whole epoch in one device-to-host copy
            ends = torch.cumsum(self.multi_lengths[self.items[index]], 0)
            bounds = torch.tensor([min(lo + size, n) - 1 for lo in range(0, n, size)], device=self.device)
            cut = ends[bounds]
            multi_totals = torch.diff(cut, prepend=cut.new_zeros(1)).tolist()
        spans = [(lo, min(lo + self.batches_per_chunk, full)) for lo in range(0, full, self.batches_per_chunk)]
        if n > full * size:
            spans.append((full, full + 1))
        for lo, hi in spans:  # batches [lo, hi) of the epoch
            if hi <= self.skip:
                continue
            rows = index[lo * size:min(hi * size, n)]
            yield from self._chunk(rows, first[lo * size:min(hi * size, n)], hi - lo,
                                   multi_totals[lo:hi] if self.multi else [], max(0, self.skip - lo))

    def _chunk(self, rows: torch.Tensor, first: torch.Tensor, count: int, multi_totals: List[int], skip: int):
        """Batches of `count` equal parts of `rows` (one part for a last, shorter batch), the same
        KeyedJaggedTensors as `KJTBuilder.build` makes of those rows, without the first `skip`."""
        size = len(rows) // count
        users, items = self.users[rows].view(count, size), self.items[rows].view(count, size)
        # (batch, single-valued key, row): each batch's block of single-valued values is contiguous
        singles = torch.cat([self.user_columns[users], self.item_columns[items]], dim=2).transpose(1, 2).contiguous()
        keys = len(self.builder.keys)
        lengths = torch.ones(count, keys, size, dtype=torch.int32, device=self.device)
        labels, first = self.labels[rows].view(count, size), first.view(count, size)
        per_key = [size] * keys
        if self.multi:
            flat = items.reshape(-1)
            starts, lens = self.multi_indptr[flat], self.multi_lengths[flat]
            lengths[:, self.multi_key] = lens.view(count, size)
            total = sum(multi_totals)
            multi = self.multi_values[ranges(starts, lens, total)]  # every selected item's values
            bounds = [0, *itertools.accumulate(multi_totals)]
        for b in range(skip, count):
            if self.multi:
                m = self.multi_key
                parts = [singles[b, :m].reshape(-1), multi[bounds[b]:bounds[b + 1]], singles[b, m:].reshape(-1)]
                values = torch.cat([p for p in parts if len(p)])
                per_key[m] = multi_totals[b]
            else:
                values = singles[b].reshape(-1)
            features = KeyedJaggedTensor(keys=self.builder.keys, values=values, lengths=lengths[b].reshape(-1),
                                         stride=size, length_per_key=list(per_key),
                                         offset_per_key=[0, *itertools.accumulate(per_key)])
            yield Batch(features, labels[b], first[b])
