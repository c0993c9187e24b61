"""Full-ranking Recall@k / NDCG@k against a brute-force reference, and the popularity baseline."""
import math

import numpy as np
import pytest
import torch

from twotower_lit.data.csr import Csr
from twotower_lit.metrics import PopularityBaseline, rank_users


def brute_force(user_vecs, users, item_vecs, seen, positives, k):
    recalls, ndcgs = [], []
    for row, u in enumerate(users):
        pos = set(positives.items_of(np.array([u])).tolist())
        if not pos:
            continue
        banned = set(seen.items_of(np.array([u])).tolist()) | {0}
        scores = (item_vecs @ user_vecs[row]).tolist()
        ranked = sorted((i for i in range(len(scores)) if i not in banned), key=lambda i: -scores[i])[:k]
        hits = [1.0 if i in pos else 0.0 for i in ranked]
        recalls.append(sum(hits) / len(pos))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        ideal = sum(1 / math.log2(r + 2) for r in range(min(len(pos), k)))
        ndcgs.append(dcg / ideal)
    return np.mean(recalls), np.mean(ndcgs), len(recalls)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_csr_from_pairs_lists_each_users_items_in_order(dtype):
    """Per-user item lists built by sorting keys equal a plain Python grouping (duplicate pairs
    kept, users without pairs empty), and no pairs give empty lists."""
    rng = np.random.default_rng(3)
    n_users = 50
    users, items = rng.integers(1, n_users - 5, 2_000).astype(dtype), rng.integers(0, 300, 2_000).astype(dtype)
    csr = Csr.from_pairs(users, items, n_users)
    assert csr.indptr.shape == (n_users + 1,) and csr.indices.dtype == np.int64
    for u in range(n_users):
        expected = sorted(int(i) for uu, i in zip(users, items) if uu == u)
        assert csr.indices[csr.indptr[u]:csr.indptr[u + 1]].tolist() == expected
    empty = Csr.from_pairs(np.zeros(0, dtype=dtype), np.zeros(0, dtype=dtype), 4)
    assert empty.indptr.tolist() == [0, 0, 0, 0, 0] and len(empty.indices) == 0


def test_rank_users_equals_brute_force():
    rng = np.random.default_rng(0)
    n_users, n_items, k = 40, 60, 5
    users = np.arange(1, n_users)
    seen = Csr.from_pairs(rng.integers(1, n_users, 300), rng.integers(1, n_items, 300), n_users)
    pu, pi = rng.integers(1, n_users, 200), rng.integers(1, n_items, 200)
    keys = np.unique(pu * n_items + pi)
    keys = keys[~np.isin(keys, seen.keys(n_items))]  # held-out positives are never training items
    positives = Csr.from_pairs(keys // n_items, keys % n_items, n_users)
    gen = torch.Generator().manual_seed(0)
    user_vecs = torch.randn(len(users), 8, generator=gen)
    item_vecs = torch.randn(n_items, 8, generator=gen)
    totals = rank_users(user_vecs, users, item_vecs, seen, positives, k, chunk=7).as_dict(k)
    recall, ndcg, count = brute_force(user_vecs, users, item_vecs, seen, positives, k)
    assert totals["ranked_users"] == count > 0
    assert abs(totals["recall@5"] - recall) < 1e-9
    assert abs(totals["ndcg@5"] - ndcg) < 1e-9


def test_item_zero_is_never_ranked_even_when_it_scores_highest():
    """Row 0 (the out-of-vocabulary item) gets the top score for every user: were it ranked, it would
    take a top-k slot from a held-out positive. Worked by hand: user 1's positives are items 3 and 4,
    user 2's item 2; the scores order the real items 4 > 3 > 2 > 1 for everyone, and user 2 saw item 4
    in training."""
    num_users, k = 3, 2
    users = np.array([1, 2])
    item_vecs = torch.tensor([[100.0], [1.0], [2.0], [3.0], [4.0]])
    user_vecs = torch.ones(2, 1)
    seen = Csr.from_pairs(np.array([2]), np.array([4]), num_users)
    positives = Csr.from_pairs(np.array([1, 1, 2]), np.array([3, 4, 2]), num_users)
    got = rank_users(user_vecs, users, item_vecs, seen, positives, k).as_dict(k)
    # user 1: top-2 = [4, 3], both positives -> recall 1, ndcg 1; user 2: top-2 = [3, 2], the hit at rank 2
    ndcg_user2 = (1 / math.log2(3)) / 1.0
    assert got["ranked_users"] == 2
    assert got["recall@2"] == pytest.approx((1.0 + 1.0) / 2)
    assert got["ndcg@2"] == pytest.approx((1.0 + ndcg_user2) / 2)


def test_popularity_ranks_by_rating_count_and_shrinks_rates():
    train_items = np.array([1, 1, 1, 2, 3, 3])
    train_labels = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    base = PopularityBaseline(train_items, train_labels, num_items=4, prior_strength=2.0)
    assert base.item_vectors().squeeze(1).tolist() == [0.0, 3.0, 1.0, 2.0]
    prior = train_labels.mean()
    assert abs(base.probability(np.array([2]))[0] - (1 + 2 * prior) / (1 + 2)) < 1e-12


def test_popularity_rates_use_each_items_positives_and_the_default_prior_strength():
    train_items = np.array([1, 1, 1, 2, 3, 3])
    train_labels = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    prior = 3 / 6
    base = PopularityBaseline(train_items, train_labels, num_items=5)  # prior strength 10 ratings
    expected = [(0 + 10 * prior) / 10, (2 + 10 * prior) / 13, (1 + 10 * prior) / 11, (0 + 10 * prior) / 12,
                (0 + 10 * prior) / 10]
    np.testing.assert_allclose(base.probability(np.arange(5)), expected, rtol=1e-12)
    assert base.item_vectors().shape == (5, 1)  # every item, rated or not
    empty = PopularityBaseline(np.zeros(0, np.int64), np.zeros(0), num_items=3)
    np.testing.assert_allclose(empty.probability(np.arange(3)), [0.5, 0.5, 0.5])  # no labels: an even prior


def test_retrieval_totals_add_up_and_average():
    from twotower_lit.metrics import RetrievalTotals

    total = RetrievalTotals(1.5, 0.75, 3) + RetrievalTotals(0.5, 0.25, 1)
    assert (total.recall, total.ndcg, total.users) == (2.0, 1.0, 4)
    assert total.as_dict(5) == {"recall@5": 0.5, "ndcg@5": 0.25, "ranked_users": 4.0}
    assert RetrievalTotals().as_dict(10) == {"recall@10": 0.0, "ndcg@10": 0.0, "ranked_users": 0.0}
