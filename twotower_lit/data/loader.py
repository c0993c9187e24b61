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
5. Resuming mid-epoch with another world size or batch size: the rows the checkpoint's ranks had
   trained are found again by replaying their row order (indices only, no data read), left out
   of the epoch's sequence, and the rest is split over the new ranks by rule 2 (wrapping around
   as often as needed when fewer rows than ranks are left). With the same world size and batch
   size the epoch simply continues (4.).

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
from twotower_lit.data.negatives import NegativeSampler
from twotower_lit.data.storage import resolve

Segment = Tuple[int, int, int, bool]  # (shard index, first row, end row, is a wrap-around re-read)
Layout = Tuple[int, int, int]  # (world size, per-rank batch size, batches each rank trained)


def epoch_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)


def concat_ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, b) for a, b in zip(lo, hi)])`` without a Python loop."""
    lens = np.asarray(hi, dtype=np.int64) - lo
    return np.repeat(np.asarray(lo, dtype=np.int64) - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))


@dataclass(frozen=True)
class Segments:
    """A rank's rows of an epoch in reading order: rows ``[lo, hi)`` of shard ``shard`` per entry,
    ``wrapped`` marking wrap-around re-reads (rule 2 of the module doc)."""

    shard: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    wrapped: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)

    def __iter__(self) -> Iterator[Segment]:
        return iter(zip(self.shard.tolist(), self.lo.tolist(), self.hi.tolist(), self.wrapped.tolist()))

    def __getitem__(self, part: slice) -> "Segments":
        return Segments(self.shard[part], self.lo[part], self.hi[part], self.wrapped[part])

    @property
    def rows(self) -> int:
        return int((self.hi - self.lo).sum())

    def reads(self) -> List["Segments"]:
        """Consecutive segments of one shard with the same wrap flag (a resumed epoch's rows of a
        shard come in many pieces): each is read from its shard at once."""
        cut = np.flatnonzero((self.shard[1:] != self.shard[:-1]) | (self.wrapped[1:] != self.wrapped[:-1])) + 1
        bounds = [0, *cut.tolist(), len(self)]
        return [self[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class EpochSequence:
    """An epoch's rows as one sequence (rule 1 of the module doc): position ``p`` is row
    ``p - starts[k]`` of shard ``order[k]``, for the ``k`` with ``starts[k] <= p < starts[k + 1]``."""

    def __init__(self, shard_rows: Sequence[int], seed: int, epoch: int, shuffle: bool = True) -> None:
        self.order = epoch_order(len(shard_rows), seed, epoch) if shuffle else np.arange(len(shard_rows))
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(shard_rows, dtype=np.int64)[self.order])])
        self.first = np.empty(len(shard_rows), dtype=np.int64)  # each shard's first position
        self.first[self.order] = self.starts[:-1]
        self.total = int(self.starts[-1])

    def all(self) -> np.ndarray:
        """The whole sequence as spans (rows of ``[start, end)`` positions)."""
        return np.array([[0, self.total]], dtype=np.int64)

    def segments(self, lo: np.ndarray, hi: np.ndarray, wrapped: np.ndarray) -> Segments:
        """The shard segments of the position ranges ``[lo, hi)``, in order."""
        keep = hi > lo
        lo, hi, wrapped = lo[keep], hi[keep], wrapped[keep]
        k0 = np.searchsorted(self.starts, lo, side="right") - 1
        k1 = np.searchsorted(self.starts, hi - 1, side="right") - 1
        which = np.repeat(np.arange(len(lo)), k1 - k0 + 1)
        k = concat_ranges(k0, k1 + 1)
        a = np.maximum(lo[which], self.starts[k]) - self.starts[k]
        b = np.minimum(hi[which], self.starts[k + 1]) - self.starts[k]
        keep = b > a  # (empty shards)
        return Segments(self.order[k][keep], a[keep], b[keep], wrapped[which][keep])

    def positions(self, segments: Segments) -> np.ndarray:
        """The positions of the segments' rows, in order."""
        first = self.first[segments.shard]
        return concat_ranges(first + segments.lo, first + segments.hi)


def span_rows(spans: np.ndarray) -> int:
    return int((spans[:, 1] - spans[:, 0]).sum())


def assign_rows(shard_rows: Sequence[int], world: int, rank: int, seed: int, epoch: int, shuffle: bool = True,
                remaining: Optional[np.ndarray] = None) -> Segments:
    """The segments that `rank` reads this epoch (see module doc); `remaining`: the spans of the
    epoch's sequence still to train when resuming it mid-epoch on another layout (rule 5)."""
    seq = EpochSequence(shard_rows, seed, epoch, shuffle)
    if seq.total and seq.total < world:
        raise ValueError(f"{seq.total} rows cannot be spread over {world} ranks; use fewer processes")
    spans = seq.all() if remaining is None else remaining
    left = span_rows(spans)
    if left == 0:
        return seq.segments(*(np.zeros(0, np.int64),) * 2, np.zeros(0, bool))
    per_rank = math.ceil(left / world)
    # this rank's range of the rows left, as pieces of whole passes over them: the last rank's
    # range wraps around to the start (more than once only when fewer rows than ranks are left)
    pieces, a = [], rank * per_rank
    while a < (rank + 1) * per_rank:
        lap, offset = divmod(a, left)
        b = min((rank + 1) * per_rank, (lap + 1) * left)
        pieces.append((offset, offset + b - a, lap > 0))
        a = b
    ends = np.cumsum(spans[:, 1] - spans[:, 0])
    starts = ends - (spans[:, 1] - spans[:, 0])
    lo, hi, wrapped = [], [], []
    for p, q, lap in pieces:  # rows [p, q) of those left -> their positions, span by span
        a, b = np.maximum(starts, p), np.minimum(ends, q)
        keep = a < b
        lo.append(spans[keep, 0] + (a - starts)[keep])
        hi.append(spans[keep, 0] + (b - starts)[keep])
        wrapped.append(np.full(int(keep.sum()), lap))
    return seq.segments(np.concatenate(lo), np.concatenate(hi), np.concatenate(wrapped))


def spans_without(spans: np.ndarray, positions: np.ndarray, total: int) -> np.ndarray:
    """`spans` less the given positions (spans: rows of ``[start, end)`` positions of a sequence
    of `total`)."""
    inside = np.zeros(total + 1, dtype=np.int8)
    np.add.at(inside, spans[:, 0], 1)
    np.add.at(inside, spans[:, 1], -1)
    keep = np.cumsum(inside[:-1], dtype=np.int8) > 0
    keep[positions] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.view(np.int8), [0]])))
    return edges.reshape(-1, 2).astype(np.int64)


def untrained_rows(reader, layouts: Sequence[Layout]) -> np.ndarray:
    """The spans of `reader`'s epoch still to train after `layouts` trained, one after another,
    their first batches (each over the rows the ones before it left). Replays each layout's
    row order with `reader.trained_positions` (indices only)."""
    seq = EpochSequence(reader.shard_rows, reader.seed, reader.epoch, reader.shuffle)
    spans = seq.all()
    for world, batch_size, batches in layouts:
        done = [reader.trained_positions(spans, world, rank, batch_size, batches) for rank in range(world)]
        spans = spans_without(spans, np.concatenate(done), seq.total)
    return spans


def resume_epoch(reader, layouts: Sequence[Layout]) -> Tuple[List[Layout], int]:
    """Set `reader` (its epoch set) to train the rest of an epoch whose first batches were trained
    by `layouts` (world size, batch size, batches), in order: the same world and batch size as the
    last layout continue it (its batches are skipped); another one starts a new layout over the
    rows left (rule 5). Returns the layouts before the one `reader` trains, and that one's
    batches already trained."""
    layouts = [tuple(layout) for layout in layouts if layout[2]]
    same = bool(layouts) and layouts[-1][:2] == (reader.world, reader.batch_size)
    earlier, skip = (layouts[:-1], layouts[-1][2]) if same else (layouts, 0)
    reader.remaining = untrained_rows(reader, earlier) if earlier else None
    reader.skip, reader.layout = skip, len(earlier)
    return earlier, skip


def num_batches(total_rows: int, world: int, batch_size: int) -> int:
    """Batches each rank yields per epoch (identical on every rank)."""
    return math.ceil(math.ceil(total_rows / world) / batch_size) if total_rows else 0


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


class ResumableEpoch:
    """What the two training readers share for resuming an epoch mid-way (rule 5 of the module
    doc): the rows still to train and the batches of them already trained."""

    shard_rows: Sequence[int]
    world: int
    rank: int
    batch_size: int
    seed: int
    epoch: int
    shuffle: bool
    remaining: Optional[np.ndarray] = None  # spans of the epoch's sequence left to train (None: all of it)
    skip = 0  # batches of those this rank already trained
    layout = 0  # layouts of this epoch before this one

    def segments(self, world: int, rank: int, remaining: Optional[np.ndarray]) -> Segments:
        return assign_rows(self.shard_rows, world, rank, self.seed, self.epoch, self.shuffle, remaining)

    def epoch_batches(self) -> int:
        """Batches of this epoch's rows, the ones skipped included (the same on every rank)."""
        rows = span_rows(self.remaining) if self.remaining is not None else int(sum(self.shard_rows))
        return num_batches(rows, self.world, self.batch_size)

    def trained_positions(self, remaining: Optional[np.ndarray], world: int, rank: int, batch_size: int,
                          batches: int) -> np.ndarray:
        """Positions in the epoch's sequence of the rows that `rank` of `world` trains in its first
        `batches` batches of `batch_size` over `remaining` (this reader's row order, no data read)."""
        raise NotImplementedError


def rank_generator(seed: int, epoch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank])


def shuffled_batches(chunks: Iterator[List[np.ndarray]], batch_size: int, buffer_rows: int,
                     rng: Optional[np.random.Generator]) -> Iterator[List[np.ndarray]]:
    """Batches of the rows of `chunks` (lists of equally long columns) through the shuffle buffer
    of rule 3 of the module doc (in order without `rng`)."""
    buf: Optional[List[np.ndarray]] = None
    for chunk in chunks:
        buf = chunk if buf is None else [np.concatenate([b, c]) for b, c in zip(buf, chunk)]
        if len(buf[0]) < buffer_rows:
            continue
        if rng is not None:
            perm = rng.permutation(len(buf[0]))
            buf = [b[perm] for b in buf]
        # emit the first half's full batches; the rest stays to mix with what comes next
        n_out = (len(buf[0]) // 2) // batch_size * batch_size
        for lo in range(0, n_out, batch_size):
            yield [b[lo:lo + batch_size] for b in buf]
        buf = [b[n_out:] for b in buf]
    if buf is None:
        return
    if rng is not None and len(buf[0]):
        perm = rng.permutation(len(buf[0]))
        buf = [b[perm] for b in buf]
    for lo in range(0, len(buf[0]), batch_size):
        yield [b[lo:lo + batch_size] for b in buf]


class RatingsShardReader(ResumableEpoch, IterableDataset):
    """Streams this rank's (and this worker's) rows of one split as `Batch`es."""

    columns = ("user", "item", "label")

    def __init__(self, source: ShardSource, builder: KJTBuilder, batch_size: int, world: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, buffer_rows: int = 1 << 18, negatives: int = 0,
                 sampler: Optional[NegativeSampler] = None, prefetch_batches: int = 4) -> None:
        if negatives and sampler is None:
            raise ValueError("negatives > 0 needs a NegativeSampler")
        self.source = source
        self.shard_rows = source.rows
        self.builder = builder
        self.batch_size = batch_size
        self.world = world
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_rows = buffer_rows  # at least a batch (see `_buffer`)
        self.negatives = negatives
        self.sampler = sampler
        self.epoch = 0
        self.prefetch = prefetch_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches in a whole epoch (Lightning's epoch length; a resumed epoch's count starts where
        the batches left end on it)."""
        return num_batches(self.source.total_rows, self.world, self.batch_size)

    def _buffer(self, batch_size: int) -> int:
        return max(self.buffer_rows, batch_size)

    def _chunks(self, segments: Segments) -> Iterator[List[np.ndarray]]:
        for part in segments.reads():
            table = read_columns(self.source.paths[int(part.shard[0])], self.columns)
            table = (table.slice(int(part.lo[0]), part.rows) if len(part) == 1
                     else table.take(concat_ranges(part.lo, part.hi)))
            yield [table.column("user").to_numpy().astype(np.int64),
                   table.column("item").to_numpy().astype(np.int64),
                   table.column("label").to_numpy().astype(np.float32),
                   np.full(part.rows, not part.wrapped[0])]

    def _row_batches(self) -> Iterator[List[np.ndarray]]:
        """(users, items, labels, first_read) of each batch of this rank, in order."""
        rng = rank_generator(self.seed, self.epoch, self.rank) if self.shuffle else None
        segments = self.segments(self.world, self.rank, self.remaining)
        return shuffled_batches(self._chunks(segments), self.batch_size, self._buffer(self.batch_size), rng)

    def trained_positions(self, remaining: Optional[np.ndarray], world: int, rank: int, batch_size: int,
                          batches: int) -> np.ndarray:
        seq = EpochSequence(self.shard_rows, self.seed, self.epoch, self.shuffle)
        chunks = ([seq.positions(part)] for part in self.segments(world, rank, remaining).reads())
        rng = rank_generator(self.seed, self.epoch, rank) if self.shuffle else None
        done = [b[0] for _, b in zip(range(batches),
                                     shuffled_batches(chunks, batch_size, self._buffer(batch_size), rng))]
        return np.concatenate(done) if done else np.zeros(0, dtype=np.int64)

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
        # a later layout of a resumed epoch numbers its batches from 0 again: it draws its own
        later = [self.layout] if self.layout else []
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, index, 1, *later])
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
    """A DataLoader that tells its dataset the epoch (`epoch_fn`) each time it is iterated and,
    when resuming mid-epoch, lets `resume_fn(dataset)` set where the epoch continues
    (`resume_epoch`) once the epoch is set.

    Lightning only calls `set_epoch` on samplers, and an IterableDataset has none.
    """

    def __init__(self, dataset: ResumableEpoch, epoch_fn: Callable[[], int],
                 resume_fn: Optional[Callable[[ResumableEpoch], None]] = None, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn
        self._resume_fn = resume_fn

    def __iter__(self):
        self.dataset.set_epoch(self._epoch_fn())
        self.dataset.remaining, self.dataset.skip, self.dataset.layout = None, 0, 0
        if self._resume_fn is not None:
            self._resume_fn(self.dataset)
        return super().__iter__()
