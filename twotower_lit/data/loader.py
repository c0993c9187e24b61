"""Per-rank streaming of prepared rating shards into `Batch`es.

Row assignment (the policy every rank and worker follows, a pure function of the shard sizes,
world size, seed and epoch, so no coordination is needed):

1. The split's shards are put in a seeded order that changes every epoch and viewed as one
   sequence of ``N`` rows.
2. Each of the ``world`` ranks takes a contiguous range of ``ceil(N / world)`` rows; the last
   range wraps around to the start, so up to ``world - 1`` rows are read twice in an epoch and
   none is skipped. Every rank therefore has the same number of rows and, with the same batch
   size and worker count, exactly the same number of batches (DMP's collectives need that).
3. Rows pass through an in-memory shuffle buffer and are cut into batches; every batch is full
   except the rank's last one.
4. With ``W`` loader workers, every worker reads the rank's rows but assembles (features,
   negatives) only every ``W``-th batch, so the batch sequence, and the training result, do not
   depend on the number of workers, and resuming mid-epoch continues exactly where it stopped.

A rank reads only the shards its range touches (at most ``ceil(N / world / shard_rows) + 1``).
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from twotower_lit.data.batches import Batch, KJTBuilder
from twotower_lit.data.storage import resolve

Segment = Tuple[int, int, int, bool]  # (shard index, first row, end row, is a wrap-around re-read)


def epoch_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)


def assign_rows(shard_rows: Sequence[int], world: int, rank: int, seed: int, epoch: int,
                shuffle: bool = True) -> List[Segment]:
    """The (shard, start, end, wrapped) segments that `rank` reads this epoch (see module doc)."""
    order = epoch_order(len(shard_rows), seed, epoch) if shuffle else np.arange(len(shard_rows))
    sizes = np.asarray(shard_rows, dtype=np.int64)[order]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    if total == 0:
        return []
    per_rank = math.ceil(total / world)
    w_lo, w_hi = rank * per_rank, (rank + 1) * per_rank
    if total < world:
        raise ValueError(f"{total} rows cannot be spread over {world} ranks; use fewer processes")
    pieces = []
    if w_lo < total:
        pieces.append((w_lo, min(w_hi, total), False))
    if w_hi > total:  # the wrap-around of the last rank
        pieces.append((max(w_lo, total) - total, w_hi - total, True))
    segments: List[Segment] = []
    for a, b, wrapped in pieces:
        k = int(np.searchsorted(starts, a, side="right") - 1)
        while a < b:
            take = min(b, int(starts[k + 1]))
            segments.append((int(order[k]), a - int(starts[k]), take - int(starts[k]), wrapped))
            a = take
            k += 1
    return segments


def num_batches(total_rows: int, world: int, batch_size: int) -> int:
    """Batches each rank yields per epoch (identical on every rank)."""
    return math.ceil(math.ceil(total_rows / world) / batch_size) if total_rows else 0


class NegativeSampler:
    """Draws items a user has not rated in training, uniformly or by training popularity.

    Membership of (user, item) in the training pairs is a bit lookup when the user x item grid
    fits in `max_bitset_bytes` (random reads into a few MB stay in cache: ~10x faster than binary
    search), else a binary search over the sorted pair keys.
    """

    def __init__(self, seen_keys: np.ndarray, num_items: int, mode: str = "uniform",
                 item_counts: Optional[np.ndarray] = None, max_bitset_bytes: int = 256 << 20) -> None:
        self.seen_keys = seen_keys  # sorted user * num_items + item of every training pair
        self.num_items = num_items
        grid = int(seen_keys[-1]) + 1 if len(seen_keys) else 0
        self.bits = None
        if 0 < grid <= max_bitset_bytes * 8:
            self.bits = np.zeros((grid + 7) // 8, dtype=np.uint8)
            np.bitwise_or.at(self.bits, seen_keys >> 3, (1 << (seen_keys & 7)).astype(np.uint8))
        if mode == "popularity":
            p = np.asarray(item_counts, dtype=np.float64).copy()
            p[0] = 0.0  # never the out-of-vocabulary row
            self.cdf = np.cumsum(p / p.sum())
        elif mode == "uniform":
            self.cdf = None
        else:
            raise ValueError(f"negative_sampling must be 'uniform' or 'popularity', got {mode!r}")

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


@dataclass
class ShardSource:
    """Where a split's shards are: paths (local or s3://) and row counts from the manifest."""

    paths: List[str]
    rows: List[int]

    @property
    def total_rows(self) -> int:
        return int(sum(self.rows))


def read_columns(path: str, columns: Sequence[str]) -> pa.Table:
    """Read columns of a Parquet file from a local path or an s3:// URI."""
    filesystem, inner = resolve(path)
    return pq.read_table(inner, columns=list(columns), filesystem=filesystem)


class RatingsShardReader(IterableDataset):
    """Streams this rank's (and this worker's) rows of one split as `Batch`es."""

    columns = ("user", "item", "label")

    def __init__(self, source: ShardSource, builder: KJTBuilder, batch_size: int, world: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, buffer_rows: int = 1 << 18, negatives: int = 0,
                 sampler: Optional[NegativeSampler] = None, prefetch_batches: int = 4) -> None:
        if negatives and sampler is None:
            raise ValueError("negatives > 0 needs a NegativeSampler")
        self.source = source
        self.builder = builder
        self.batch_size = batch_size
        self.world = world
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_rows = max(buffer_rows, batch_size)
        self.negatives = negatives
        self.sampler = sampler
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained on (resuming mid-epoch)
        self.prefetch = prefetch_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches in a whole epoch (Lightning counts a resumed epoch's batches from where it stopped)."""
        return num_batches(self.source.total_rows, self.world, self.batch_size)

    def _chunks(self, segments: List[Segment]) -> Iterator[List[np.ndarray]]:
        for shard, lo, hi, wrapped in segments:
            table = read_columns(self.source.paths[shard], self.columns).slice(lo, hi - lo)
            yield [table.column("user").to_numpy().astype(np.int64),
                   table.column("item").to_numpy().astype(np.int64),
                   table.column("label").to_numpy().astype(np.float32),
                   np.full(hi - lo, not wrapped)]

    def _row_batches(self) -> Iterator[List[np.ndarray]]:
        """(users, items, labels, first_read) of each batch of this rank, in order."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        buf = [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool)]
        segments = assign_rows(self.source.rows, self.world, self.rank, self.seed, self.epoch, self.shuffle)
        for chunk in self._chunks(segments):
            buf = [np.concatenate([b, c]) for b, c in zip(buf, chunk)]
            if len(buf[0]) < self.buffer_rows:
                continue
            if self.shuffle:
                perm = rng.permutation(len(buf[0]))
                buf = [b[perm] for b in buf]
            # emit the first half's full batches; the rest stays to mix with what comes next
            n_out = (len(buf[0]) // 2) // self.batch_size * self.batch_size
            for lo in range(0, n_out, self.batch_size):
                yield [b[lo:lo + self.batch_size] for b in buf]
            buf = [b[n_out:] for b in buf]
        if self.shuffle and len(buf[0]):
            perm = rng.permutation(len(buf[0]))
            buf = [b[perm] for b in buf]
        for lo in range(0, len(buf[0]), self.batch_size):
            yield [b[lo:lo + self.batch_size] for b in buf]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # batch i goes to worker (i - skip) % workers: a DataLoader takes one batch from each worker
        # in turn, starting with worker 0, so the batches arrive in their original order
        batches = (self._batch(*rows, index=i) for i, rows in enumerate(self._row_batches())
                   if i >= self.skip and (i - self.skip) % workers == worker)
        # without loader worker processes, assemble the next batches in a thread meanwhile
        return batches if info is not None or not self.prefetch else prefetch(batches, self.prefetch)

    def _batch(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray, first_read: np.ndarray,
               index: int) -> Batch:
        """`rated` marks the rows metrics count: rated rows read for the first time this epoch
        (not wrap-around re-reads, not sampled negatives); the loss uses every row.
        Negatives come from a generator of their own per batch, so resuming mid-epoch (skipping
        batches) draws exactly the negatives an uninterrupted run would."""
        if not self.negatives:
            return self.builder.batch(users, items, labels, first_read)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, index, 1])
        nu, ni = self.sampler.sample(users, self.negatives, rng)
        rated = np.zeros(len(users) + len(nu), dtype=bool)
        rated[: len(users)] = first_read
        return self.builder.batch(np.concatenate([users, nu]), np.concatenate([items, ni]),
                                  np.concatenate([labels, np.zeros(len(nu), np.float32)]), rated)


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a background thread, `depth` ahead (numpy and Arrow release the GIL)."""
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
            q.put(e)

    thread = threading.Thread(target=produce, name="shard-reader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class EpochAwareDataLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch (`epoch_fn`) and, when resuming mid-epoch, how
    many batches to pass over (`skip_fn(epoch)`), each time it is iterated.

    Lightning only calls `set_epoch` on samplers, and an IterableDataset has none.
    """

    def __init__(self, dataset: RatingsShardReader, epoch_fn: Callable[[], int],
                 skip_fn: Optional[Callable[[int], int]] = None, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn
        self._skip_fn = skip_fn

    def __iter__(self):
        epoch = self._epoch_fn()
        self.dataset.set_epoch(epoch)
        self.dataset.skip = self._skip_fn(epoch) if self._skip_fn else 0
        return super().__iter__()
