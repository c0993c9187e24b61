"""Row assignment, batch counts, shuffling and negative sampling of the per-rank shard reader."""
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from twotower_lit.data.batches import FeatureTables, KJTBuilder
from twotower_lit.data.csr import Csr
from twotower_lit.data.loader import RatingsShardReader, ShardSource, assign_rows, num_batches
from twotower_lit.data.negatives import NegativeSampler


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_row_is_read_and_ranks_get_equal_rows(world):
    shard_rows = [10, 7, 0, 5, 13]
    total = sum(shard_rows)
    counts = np.zeros(total, dtype=int)
    offsets = np.concatenate([[0], np.cumsum(shard_rows)])
    per_rank = []
    for rank in range(world):
        n = 0
        for shard, lo, hi, _ in assign_rows(shard_rows, world, rank, seed=3, epoch=1):
            counts[offsets[shard] + lo:offsets[shard] + hi] += 1
            n += hi - lo
        per_rank.append(n)
    assert len(set(per_rank)) == 1, per_rank  # equal rows -> equal batches on every rank
    assert counts.min() == 1  # no rating is skipped
    assert counts.sum() - total == per_rank[0] * world - total < world  # re-reads only to even out ranks


def test_shard_order_depends_on_seed_and_epoch_only():
    rows = [5] * 8
    a = list(assign_rows(rows, 2, 0, seed=0, epoch=0))
    assert a == list(assign_rows(rows, 2, 0, seed=0, epoch=0))
    assert a != list(assign_rows(rows, 2, 0, seed=0, epoch=1))
    assert a != list(assign_rows(rows, 2, 0, seed=1, epoch=0))


def _write_split(tmp_path, n_rows, n_shards, n_users=30, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(1, n_users, n_rows).astype(np.int32)
    items = rng.integers(1, n_items, n_rows).astype(np.int32)
    labels = (rng.random(n_rows) < 0.5).astype(np.float32)
    paths, rows = [], []
    for k, idx in enumerate(np.array_split(np.arange(n_rows), n_shards)):
        p = tmp_path / f"part-{k}.parquet"
        pq.write_table(pa.table({"user": users[idx], "item": items[idx], "label": labels[idx]}), p)
        paths.append(str(p))
        rows.append(len(idx))
    genres = pa.array([[1, 2], [], [3]] * (n_items // 3 + 1), type=pa.list_(pa.int32()))[: n_items - 1]
    items_t = pa.table({"item": pa.array(np.arange(1, n_items, dtype=np.int32)), "genres": genres})
    users_t = pa.table({"user": pa.array(np.arange(1, n_users, dtype=np.int32))})
    tables = FeatureTables.from_frames(users_t, items_t, n_users, n_items, ["user"], ["item", "genres"])
    builder = KJTBuilder(tables, ["user"], ["item", "genres"])
    return ShardSource(paths, rows), builder, (users, items, labels)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_reader_yields_announced_batches_and_all_rows(tmp_path, world):
    source, builder, (users, items, _) = _write_split(tmp_path, 1003, 5)
    seen = []
    lengths = []
    for rank in range(world):
        reader = RatingsShardReader(source, builder, batch_size=64, world=world, rank=rank, seed=1,
                                    buffer_rows=128)
        batches = list(reader)
        assert len(batches) == len(reader) == num_batches(1003, world, 64)
        lengths.append(len(batches))
        for b in batches:
            kjt = b.features.to_dict()
            seen.append(np.stack([kjt["user"].values().numpy(), kjt["item"].values().numpy()], 1))
    assert len(set(lengths)) == 1
    got = np.concatenate(seen)
    expected = np.stack([users, items], 1)
    # every input pair is read (order and re-reads aside)
    exp_keys = np.unique(expected[:, 0].astype(np.int64) * 1000 + expected[:, 1])
    got_keys = np.unique(got[:, 0].astype(np.int64) * 1000 + got[:, 1])
    assert np.array_equal(exp_keys, got_keys)


@pytest.mark.parametrize("world", [2, 3])
def test_streamed_rated_rows_are_every_input_row_exactly_once(tmp_path, world):
    """Over all ranks, the rows flagged `rated` are the input rows as a multiset: a wrap-around
    re-read (1003 rows on 2 ranks read 1004) is trained but not counted again by the metrics."""
    source, builder, (users, items, labels) = _write_split(tmp_path, 1003, 5)
    flagged, read = [], 0
    for rank in range(world):
        reader = RatingsShardReader(source, builder, batch_size=64, world=world, rank=rank, seed=1, buffer_rows=128)
        for b in reader:
            d = b.features.to_dict()
            u, i = d["user"].values().numpy(), d["item"].values().numpy()
            rated = b.rated.numpy()
            read += len(u)
            flagged.append(np.stack([u[rated], i[rated], b.labels.numpy()[rated]], 1))
    assert read == math.ceil(1003 / world) * world > 1003
    got = np.concatenate(flagged)
    expected = np.stack([users, items, labels], 1).astype(np.float64)
    assert len(got) == 1003
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], expected[np.lexsort(expected.T[::-1])])


def test_every_batch_draws_its_own_negatives(tmp_path):
    """Negatives are drawn per batch: two batches of one epoch (and one batch on two ranks) do not
    repeat the same draws. With nothing rated to reject, a shared generator would give equal items."""
    source, builder, _ = _write_split(tmp_path, 640, 2)
    sampler = NegativeSampler(np.zeros(0, dtype=np.int64), 40)

    def negatives(rank):
        reader = RatingsShardReader(source, builder, batch_size=64, world=2, rank=rank, seed=4, buffer_rows=128,
                                    negatives=3, sampler=sampler)
        out = []
        for b in reader:
            items = b.features.to_dict()["item"].values().numpy()
            assert (~b.rated.numpy()).sum() == 3 * 64  # rated rows first, then their negatives
            out.append(items[64:])
        return out

    rank0, rank1 = negatives(0), negatives(1)
    assert len(rank0) == len(rank1) == 5
    draws = rank0 + rank1[:1]
    for a in range(len(draws)):
        for b in range(a + 1, len(draws)):
            # independent uniform draws over 39 items agree at about 1 position in 39
            assert (draws[a] == draws[b]).mean() < 0.2, (a, b)


def test_reader_is_deterministic_and_reshuffles_per_epoch(tmp_path):
    source, builder, _ = _write_split(tmp_path, 500, 4)

    def first_users(epoch):
        r = RatingsShardReader(source, builder, batch_size=50, seed=7, buffer_rows=100)
        r.set_epoch(epoch)
        return next(iter(r)).features.to_dict()["user"].values().tolist()

    assert first_users(0) == first_users(0)
    assert first_users(0) != first_users(1)


def test_genres_are_jagged_per_item(tmp_path):
    source, builder, _ = _write_split(tmp_path, 10, 1)
    kjt = builder.build(np.array([1, 2, 3]), np.array([1, 2, 3]))
    genres = kjt.to_dict()["genres"]
    assert genres.lengths().tolist() == [2, 0, 1]
    assert genres.values().tolist() == [1, 2, 3]


@pytest.mark.parametrize("bitset_bytes", [0, 1 << 20])  # binary search, bit lookup
def test_negative_sampler_never_returns_a_rated_item(bitset_bytes):
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 30
    users = rng.integers(1, n_users, 800)
    items = rng.integers(1, n_items, 800)
    seen = Csr.from_pairs(users, items, n_users)
    keys = set((users * n_items + items).tolist())
    counts = np.bincount(items, minlength=n_items)
    for mode in ("uniform", "popularity"):
        sampler = NegativeSampler(seen.keys(n_items), n_items, mode, counts, max_bitset_bytes=bitset_bytes)
        assert (sampler.bits is None) == (bitset_bytes == 0)
        u, neg = sampler.sample(np.arange(1, n_users), 4, rng)
        assert len(neg) == 4 * (n_users - 1)
        assert (neg >= 1).all() and (neg < n_items).all()
        assert not any((uu * n_items + ii) in keys for uu, ii in zip(u.tolist(), neg.tolist()))


def test_popularity_sampling_follows_counts():
    n_items = 6
    counts = np.array([0, 1, 1, 1, 1, 96])
    sampler = NegativeSampler(np.zeros(0, dtype=np.int64), n_items, "popularity", counts)
    _, neg = sampler.sample(np.ones(1000, dtype=np.int64), 2, np.random.default_rng(0))
    share = (neg == 5).mean()
    assert 0.9 < share < 1.0


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_skip_resumes_exactly_where_the_epoch_stopped(tmp_path, workers):
    """Resuming mid-epoch: skipping the first n batches yields exactly the rest of the epoch
    (same rows, same negatives), with and without loader worker processes."""
    from twotower_lit.data.loader import EpochAwareDataLoader

    source, builder, (users, items, _) = _write_split(tmp_path, 900, 4)
    seen = Csr.from_pairs(users.astype(np.int64), items.astype(np.int64), 30)
    sampler = NegativeSampler(seen.keys(40), 40)

    def run(skip):
        reader = RatingsShardReader(source, builder, batch_size=64, seed=5, buffer_rows=128, negatives=2,
                                    sampler=sampler)
        def resume(dataset):
            dataset.skip = skip

        loader = EpochAwareDataLoader(reader, epoch_fn=lambda: 3, resume_fn=resume, num_workers=workers)
        return [b.features.to_dict()["item"].values().tolist() for b in loader]

    full = run(0)
    assert len(full) == num_batches(900, 1, 64)
    assert run(5) == full[5:]
    assert run(0) == full  # deterministic


def test_reader_streams_shards_from_s3(tmp_path, moto_server, monkeypatch):
    """The same reader over s3:// shards (a real moto server)."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    source, builder, (users, items, _) = _write_split(tmp_path, 300, 3)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="shards")
    uris = []
    for k, path in enumerate(source.paths):
        s3.upload_file(path, "shards", f"prepared/train/part-{k}.parquet")
        uris.append(f"s3://shards/prepared/train/part-{k}.parquet")
    local = [b.features.to_dict()["user"].values().tolist()
             for b in RatingsShardReader(source, builder, batch_size=50, world=2, rank=1, seed=0)]
    remote = [b.features.to_dict()["user"].values().tolist()
              for b in RatingsShardReader(ShardSource(uris, source.rows), builder, batch_size=50, world=2, rank=1,
                                          seed=0)]
    assert remote == local and len(remote) == 3


def test_built_features_carry_host_side_key_lengths_through_pinning(tmp_path):
    """The builder hands each key's length to the KeyedJaggedTensor (no device-to-host sync later);
    they must equal what TorchRec computes from the lengths, also after pin_memory's rebuild."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    _, builder, (users, items, labels) = _write_split(tmp_path, 300, 1)
    batch = builder.batch(users[:97].astype(np.int64), items[:97].astype(np.int64), labels[:97])
    kjts = [batch.features]
    if torch.cuda.is_available():  # pinning needs a CUDA runtime
        kjts.append(batch.pin_memory().features)
    for kjt in kjts:
        fresh = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths())
        assert kjt.length_per_key_or_none() == fresh.length_per_key()
        assert kjt.offset_per_key_or_none() == fresh.offset_per_key()
        assert kjt.stride() == 97
        genres = kjt["genres"]
        assert genres.lengths().sum().item() == kjt.length_per_key()[kjt.keys().index("genres")] > 0


def test_batch_already_on_the_device_moves_as_itself(tmp_path):
    _, builder, (users, items, labels) = _write_split(tmp_path, 300, 1)
    batch = builder.batch(users[:50].astype(np.int64), items[:50].astype(np.int64), labels[:50])
    assert batch.to("cpu") is batch and batch.to(torch.device("cpu"), non_blocking=True) is batch
    if torch.cuda.is_available():
        moved = batch.to("cuda")
        assert moved is not batch and moved.labels.is_cuda and moved.features.values().is_cuda


def _device_reader(tmp_path, world, rank, epoch=0, skip=0, n_rows=1003, chunk_rows=1 << 20):
    from twotower_lit.data.device_batches import DeviceResidentBatches

    tmp_path.mkdir(parents=True, exist_ok=True)
    source, builder, (users, items, labels) = _write_split(tmp_path, n_rows, 5)
    rows = {"user": users, "item": items, "label": labels}  # _write_split's shards are these rows in order
    reader = DeviceResidentBatches(rows, source.rows, builder, batch_size=64, world=world, rank=rank, seed=1,
                                   chunk_rows=chunk_rows)
    reader.set_epoch(epoch)
    reader.skip = skip
    return reader, builder, (users, items, labels)


@pytest.mark.parametrize("world,chunk_rows", [(1, 1 << 20), (2, 1 << 20), (3, 1 << 20), (2, 3 * 64), (1, 64)])
def test_device_resident_batches_cover_every_row_with_equal_batch_counts(tmp_path, world, chunk_rows):
    counts, pairs, flagged = [], [], 0
    for rank in range(world):
        reader, builder, (users, items, labels) = _device_reader(tmp_path / str(rank), world, rank,
                                                                 chunk_rows=chunk_rows)
        batches = list(reader)
        assert len(batches) == len(reader) == num_batches(1003, world, 64)
        counts.append(len(batches))
        for b in batches:
            d = b.features.to_dict()
            u, i = d["user"].values().numpy(), d["item"].values().numpy()
            # the device-built features are exactly what the host builder makes of the same rows
            ref = builder.build(u, i)
            assert b.features.keys() == ref.keys()
            assert torch.equal(b.features.values(), ref.values())
            assert torch.equal(b.features.lengths(), ref.lengths())
            assert b.features.length_per_key() == ref.length_per_key()
            pairs.append(np.stack([u, i], 1))
            flagged += int(b.rated.sum())
    assert len(set(counts)) == 1
    got = np.concatenate(pairs)
    expected = np.stack([users, items], 1).astype(np.int64)
    key = lambda a: np.sort(a[:, 0] * 1000 + a[:, 1])  # noqa: E731
    # every row exactly once, plus the wrap-around re-reads (not flagged as rated-for-the-first-time)
    assert len(got) == math.ceil(1003 / world) * world
    assert flagged == 1003
    assert np.array_equal(np.unique(key(got)), np.unique(key(expected)))


def test_device_resident_batches_skip_resumes_and_epochs_reshuffle(tmp_path):
    reader, _, _ = _device_reader(tmp_path, 2, 1)
    full = list(reader)
    # assembled three batches at a time: the same batches, and a resume inside a chunk
    chunked, _, _ = _device_reader(tmp_path / "chunked", 2, 1, chunk_rows=3 * 64)
    assert len(list(chunked)) == len(full)
    for a, b in zip(full, chunked):
        assert torch.equal(a.features.values(), b.features.values())
        assert torch.equal(a.features.lengths(), b.features.lengths())
        assert torch.equal(a.labels, b.labels) and torch.equal(a.rated, b.rated)
    for skip in (5, 6):
        for r in (reader, chunked):
            r.skip = skip
            tail = list(r)
            assert len(tail) == len(full) - skip
            for a, b in zip(full[skip:], tail):
                assert torch.equal(a.features.values(), b.features.values()) and torch.equal(a.labels, b.labels)
    reader.skip = 0
    assert all(torch.equal(a.features.values(), b.features.values()) for a, b in zip(full, reader))
    reader.set_epoch(1)
    assert not torch.equal(next(iter(reader)).features.values(), full[0].features.values())


def test_device_resident_data_refuses_negatives():
    from twotower_lit.data.datamodule import MovieLensDataModule

    with pytest.raises(ValueError, match="--negatives 0"):
        MovieLensDataModule("unused", negatives=2, data_on_device=True)


def test_a_mid_epoch_checkpoint_resumes_only_with_the_training_reader_that_wrote_it(prepared_synthetic):
    """The streaming and the device-resident readers order an epoch's rows differently: skipping
    a mid-epoch checkpoint's batches with the other one would repeat rows and leave out others.
    A checkpoint of a finished epoch (resumed at the next) or of an epoch's start resumes with either."""
    from twotower_lit.data.datamodule import MovieLensDataModule

    dm = MovieLensDataModule(str(prepared_synthetic), data_on_device=True)
    dm.load()
    reader = dm.train_dataloader().dataset  # one process, batch size 1024
    dm.load_state_dict({"epoch": 1, "train_batches_done": 5, "data_on_device": False})
    with pytest.raises(ValueError, match=r"5 batches into epoch 1 with its training batches streamed from the "
                                         r"shards, and this run's are built on the device.*--data-on-device false"):
        dm._take_resume_layouts(1, reader)
    for state, epoch in (({"epoch": 1, "train_batches_done": 9, "data_on_device": False}, 2),  # epoch 1 finished
                         ({"epoch": 1, "train_batches_done": 0, "data_on_device": False}, 1)):  # epoch 1 not begun
        dm.load_state_dict(state)
        assert dm._take_resume_layouts(epoch, reader) == []
    dm.load_state_dict({"epoch": 1, "train_batches_done": 5, "data_on_device": True})
    assert dm._take_resume_layouts(1, reader) == [(1, 1024, 5)]
    assert dm._take_resume_layouts(1, reader) == []  # taken once
    dm.load_state_dict({"epoch": 1, "train_batches_done": 5})  # written before the reader was recorded
    assert dm._take_resume_layouts(1, reader) == [(1, 1024, 5)]
    streaming = MovieLensDataModule(str(prepared_synthetic))
    streaming.load()
    streaming.load_state_dict({"epoch": 0, "train_batches_done": 3, "data_on_device": True})
    with pytest.raises(ValueError, match="--data-on-device true, or from an epoch-end checkpoint"):
        streaming._take_resume_layouts(0, streaming.train_dataloader().dataset)
