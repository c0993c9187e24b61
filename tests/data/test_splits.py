"""Random and temporal per-user splits, their rounding rule, determinism, and shard assignment."""
from __future__ import annotations

import numpy as np
import pytest

from twotower_lit.data.splits import (TEST, TRAIN, VAL, random_split, shard_count, shard_rows_order, split_sizes,
                                      temporal_split)


def _users(counts, seed=0):
    """Rows of users 1..len(counts) with counts[u-1] rows each, shuffled."""
    user = np.repeat(np.arange(1, len(counts) + 1), counts)
    return np.random.default_rng(seed).permutation(user).astype(np.int32)


def test_split_sizes_rounding_rule():
    counts = np.array([0, 1, 2, 3, 4, 10, 14, 15, 16, 100])
    n_val, n_test = split_sizes(counts, 0.1, 0.1)
    # < 3 ratings: all train; >= 3: at least one each; then round(n * 0.1) half up
    assert n_val.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 10]
    assert n_test.tolist() == n_val.tolist()
    n_val, n_test = split_sizes(np.array([3, 10]), 0.45, 0.45)
    assert (n_val + n_test).tolist() == [2, 9]  # one rating always stays in train
    n_val, n_test = split_sizes(np.array([5, 50]), 0.0, 0.2)
    assert n_val.tolist() == [0, 0] and n_test.tolist() == [1, 10]
    with pytest.raises(ValueError, match="sum to less than 1"):
        split_sizes(counts, 0.5, 0.5)


def test_random_split_proportions_per_user():
    counts = np.random.default_rng(1).integers(1, 300, 500)
    user = _users(counts)
    codes = random_split(user, len(counts), 0.1, 0.1, seed=7)
    n_val, n_test = split_sizes(np.bincount(user, minlength=len(counts) + 1), 0.1, 0.1)
    got_val = np.bincount(user[codes == VAL], minlength=len(counts) + 1)
    got_test = np.bincount(user[codes == TEST], minlength=len(counts) + 1)
    np.testing.assert_array_equal(got_val, n_val)
    np.testing.assert_array_equal(got_test, n_test)
    share = np.bincount(codes, minlength=3) / len(codes)
    assert abs(share[VAL] - 0.1) < 0.01 and abs(share[TEST] - 0.1) < 0.01
    eligible = np.flatnonzero(np.bincount(user) >= 3)
    assert np.isin(eligible, user[codes == TEST]).all() and np.isin(eligible, user[codes == VAL]).all()


def test_random_split_is_deterministic_and_seeded():
    user = _users(np.full(200, 50))
    a = random_split(user, 200, 0.1, 0.1, seed=3)
    assert np.array_equal(a, random_split(user, 200, 0.1, 0.1, seed=3))
    assert not np.array_equal(a, random_split(user, 200, 0.1, 0.1, seed=4))


def test_random_split_order_within_user_is_not_file_order():
    # If rows were taken in file order, test would always be each user's first rows.
    user = np.repeat(np.arange(1, 101), 20).astype(np.int32)
    codes = random_split(user, 100, 0.1, 0.1, seed=0)
    first_two = codes.reshape(100, 20)[:, :2]
    assert (first_two == TEST).mean() < 0.5


def test_temporal_split_takes_the_last_two_ratings():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 40, 300)
    user = _users(counts)
    ts = rng.integers(9e8, 1e9, len(user))
    codes = temporal_split(user, ts, len(counts))
    for u in range(1, len(counts) + 1):
        rows = np.flatnonzero(user == u)
        c, t = codes[rows], ts[rows]
        if len(rows) < 3:
            assert (c == TRAIN).all()
            continue
        assert (c == TEST).sum() == 1 and (c == VAL).sum() == 1
        assert t[c == TEST][0] >= t[c == VAL][0] >= t[c == TRAIN].max()


def test_temporal_split_ties_go_to_the_later_row():
    user = np.array([1, 1, 1, 1], np.int32)
    ts = np.array([5, 9, 9, 9])
    codes = temporal_split(user, ts, 1)
    assert codes.tolist() == [TRAIN, TRAIN, VAL, TEST]


def test_shards_cover_every_row_once_and_mix_users():
    assert shard_count(0, 100, 8) == 8 and shard_count(801, 100, 8) == 9 and shard_count(50, 10, 2) == 5
    parts = shard_rows_order(1000, 8, seed=0, split_index=0)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1000))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # rows arrive sorted by user: a random sample per shard spans the whole range
    assert all(p.min() < 200 and p.max() > 800 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, shard_rows_order(1000, 8, seed=0, split_index=0)))


@pytest.mark.parametrize("n_rows", [3, 5, 9, 17, 33, 65, 129])  # 2**k + 1 rows: the row index needs a bit more
def test_both_splits_match_a_per_user_reference_at_row_count_boundaries(n_rows):
    """Each user's codes, worked out from its own rows: the last two by (timestamp, row) are test
    and validation; the random split's per-user counts follow split_sizes. Codes are int8."""
    rng = np.random.default_rng(n_rows)
    user = rng.integers(1, 4, n_rows).astype(np.int32)
    ts = rng.integers(0, 3, n_rows)  # many ties
    for codes in (temporal_split(user, ts, 3), random_split(user, 3, 0.2, 0.2, seed=1)):
        assert codes.dtype == np.int8 and codes.shape == (n_rows,)
    codes = temporal_split(user, ts, 3)
    rand = random_split(user, 3, 0.2, 0.2, seed=1)
    counts = np.bincount(user, minlength=4)
    n_val, n_test = split_sizes(counts, 0.2, 0.2)
    for u in range(1, 4):
        rows = np.flatnonzero(user == u)
        expected = [TRAIN] * len(rows)
        if len(rows) >= 3:
            by_time = sorted(rows, key=lambda r: (ts[r], r))
            expected = [TEST if r == by_time[-1] else VAL if r == by_time[-2] else TRAIN for r in rows]
        assert codes[rows].tolist() == expected, u
        assert ((rand[rows] == TEST).sum(), (rand[rows] == VAL).sum()) == (n_test[u], n_val[u]), u


def test_temporal_split_takes_timestamps_from_0_up_to_what_packs_with_the_row_index():
    user = np.array([1, 1, 1, 2, 2, 2], np.int32)  # 6 rows: the row index takes 3 bits
    limit = 1 << (62 - 3)
    for ts in ([0, 0, 0, 1, 2, 3], [limit - 1, 0, 5, 0, limit - 1, 2]):
        codes = temporal_split(user, np.array(ts, np.int64), 2)
        assert sorted(codes[:3].tolist()) == sorted(codes[3:].tolist()) == [TRAIN, VAL, TEST]
    for ts in ([limit, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0]):
        with pytest.raises(ValueError) as err:
            temporal_split(user, np.array(ts, np.int64), 2)
        assert str(err.value) == "timestamps must be validated (0 <= t < 2**32) before the temporal split"
    assert temporal_split(np.zeros(0, np.int32), np.zeros(0, np.int64), 3).dtype == np.int8


def test_shard_count_takes_one_and_refuses_zero():
    assert shard_count(5, 1, 1) == 5 and shard_count(0, 1, 1) == 1
    for shard_rows, min_shards in ((0, 1), (1, 0), (-3, 4)):
        with pytest.raises(ValueError) as err:
            shard_count(10, shard_rows, min_shards)
        assert str(err.value) == f"shard_rows ({shard_rows}) and min_shards ({min_shards}) must be >= 1"


def test_split_fractions_are_checked_at_their_bounds():
    split_sizes(np.array([10]), 0.0, 0.0)
    split_sizes(np.array([10]), 0.49, 0.5)
    for val, test in ((1.0, 0.0), (0.0, 1.0), (-0.1, 0.2), (0.2, -0.1), (0.5, 0.5), (1.5, 0.0), (0.0, 1.5)):
        with pytest.raises(ValueError) as err:
            split_sizes(np.array([10]), val, test)
        assert str(err.value) == (f"val_fraction ({val}) and test_fraction ({test}) must be in [0, 1) and sum to "
                                  "less than 1")



@pytest.mark.parametrize("count, val, test, expected", [
    (4, 0.45, 0.45, (1, 2)),  # 2 + 2 leave no train rating: validation gives way by one
    (3, 0.6, 0.3, (1, 1)),
    (3, 0.9, 0.05, (1, 1)),  # validation gives way by two, keeping its one
    (4, 0.8, 0.15, (2, 1)),
    (3, 0.4, 0.55, (1, 1)),  # validation is at its one already: test gives way
    (5, 0.0, 0.9, (0, 4)),  # no validation asked: test gives way alone
    (3, 0.0, 0.0, (0, 0)),
    (2, 0.4, 0.4, (0, 0)),  # too few ratings to split
])
def test_split_sizes_give_way_as_documented(count, val, test, expected):
    """Worked by hand from the rule: round half up, at least one each when asked, then validation
    and after it test give way until one rating stays in train."""
    n_val, n_test = split_sizes(np.array([count]), val, test)
    assert (int(n_val[0]), int(n_test[0])) == expected
    assert n_val.dtype == n_test.dtype == np.int64
