"""Full-ranking retrieval metrics (Recall@k, NDCG@k, MRR@k, HitRate@k, coverage@k, mean popularity
rank) against a brute-force reference and a case worked by hand, the same figures from two gloo ranks,
and the popularity baseline."""
import math

import numpy as np
import pytest
import torch

from twotower_lit.data.csr import Csr
from twotower_lit.metrics import PopularityBaseline, popularity_ranks, rank_users


def brute_force(user_vecs, users, item_vecs, seen, positives, k):
    """(recall, ndcg, count) and {mrr, hit_rate, coverage, popularity_rank}: plain Python over each
    user's sorted candidates; popularity ranks by scipy's 'min' ranking of the training counts."""
    from scipy.stats import rankdata

    counts = np.bincount(seen.indices, minlength=len(item_vecs))
    pop = {i: r for i, r in zip(range(1, len(counts)), rankdata(-counts[1:], method="min"))}
    recalls, ndcgs, rrs, shown = [], [], [], []
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
        rrs.append(next((1 / (r + 1) for r, h in enumerate(hits) if h), 0.0))
        shown += ranked
    extra = {"mrr": np.mean(rrs), "hit_rate": np.mean([rr > 0 for rr in rrs]),
             "coverage": len(set(shown)) / (len(item_vecs) - 1), "popularity_rank": np.mean([pop[i] for i in shown])}
    return np.mean(recalls), np.mean(ndcgs), len(recalls), extra


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
    recall, ndcg, count, extra = brute_force(user_vecs, users, item_vecs, seen, positives, k)
    assert totals["ranked_users"] == count > 0
    assert abs(totals["recall@5"] - recall) < 1e-9
    assert abs(totals["ndcg@5"] - ndcg) < 1e-9
    for name, value in extra.items():
        assert totals[f"{name}@5"] == pytest.approx(value, abs=1e-9), name
    assert 0 < extra["coverage"] < 1 and 0 < extra["mrr"] < extra["hit_rate"] < 1


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
    """Sums add up; coverage is over the union of the items recommended (index 0 left out), the
    popularity rank a mean over recommended slots; the all-reduce vector round-trips."""
    from twotower_lit.metrics import RetrievalTotals

    a = RetrievalTotals(1.5, 0.75, 1.0, 2.0, 3, 20.0, 8, np.array([0, 2, 0, 1, 5]))
    b = RetrievalTotals(0.5, 0.25, 0.5, 1.0, 1, 4.0, 2, np.array([0, 0, 0, 2, 0]))
    total = a + b
    assert (total.recall, total.ndcg, total.mrr, total.hits, total.users) == (2.0, 1.0, 1.5, 3.0, 4)
    assert total.item_counts.tolist() == [0, 2, 0, 3, 5] and a.item_counts.tolist() == [0, 2, 0, 1, 5]
    assert total.as_dict(5) == {"recall@5": 0.5, "ndcg@5": 0.25, "mrr@5": 0.375, "hit_rate@5": 0.75,
                                "coverage@5": 0.75, "popularity_rank@5": 2.4, "ranked_users": 4.0}
    back = RetrievalTotals.from_tensor(total.to_tensor(5))
    assert back.as_dict(5) == total.as_dict(5) and back.item_counts.tolist() == total.item_counts.tolist()
    assert set(RetrievalTotals().as_dict(10).values()) == {0.0}


def test_popularity_rank_is_one_for_the_most_rated_item_and_ties_share_the_best_rank():
    # training ratings per item index: index 0 (out of vocabulary) is no catalogue item
    counts = np.array([7, 3, 2, 1, 0, 2, 0])
    assert popularity_ranks(counts).tolist() == [0, 1, 2, 4, 5, 2, 5]


def test_new_retrieval_metrics_worked_by_hand_with_ties_item_zero_and_seen_items():
    """k = 3. Scores (one dimension, every user 1): item 0 highest (never ranked), then items 1 > 2 >
    5 > 3 = 4 (a tie) > 6. Training pairs: user 1 saw 1, 2, 5; user 2 saw 1, 2, 3; user 3 saw 1, 5;
    user 4 none. So the popularity ranks are item 1: 1, items 2 and 5: 2 (tied), 3: 4, 4 and 6: 5.
    Top 3: user 1 {3, 4} then 6; user 2 [5, 4, 6]; user 3 [2, then 3 and 4]; user 4, without held-out
    positives, is not counted (its top 3 would hold item 1, the only way item 1 could be covered).
    Held out: user 1 item 6 (position 3), user 2 item 4 (position 2), user 3 item 6 (not in the top 3)."""
    users = np.array([1, 2, 3, 4])
    num_users, k = 5, 3
    item_vecs = torch.tensor([[100.0], [9.0], [8.0], [5.0], [5.0], [7.0], [1.0]])
    seen = Csr.from_pairs(np.array([1, 1, 1, 2, 2, 2, 3, 3]), np.array([1, 2, 5, 1, 2, 3, 1, 5]), num_users)
    positives = Csr.from_pairs(np.array([1, 2, 3]), np.array([6, 4, 6]), num_users)
    got = rank_users(torch.ones(4, 1), users, item_vecs, seen, positives, k).as_dict(k)
    assert got["ranked_users"] == 3
    assert got["recall@3"] == pytest.approx(2 / 3)
    assert got["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(3)) / 3)
    assert got["mrr@3"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert got["hit_rate@3"] == pytest.approx(2 / 3)
    assert got["coverage@3"] == pytest.approx(5 / 6)  # items 2-6 recommended, item 1 only to user 4
    # user 1: 4 + 5 + 5, user 2: 2 + 5 + 5, user 3: 2 + 4 + 5 over 9 slots
    assert got["popularity_rank@3"] == pytest.approx(37 / 9)


def test_a_user_with_fewer_unseen_items_than_k_fills_only_those_slots():
    """Two real items, the user saw item 1: item 2 is the only recommendation (item 0 and the seen
    item, though in torch.topk's k results at minus infinity, are no recommendations)."""
    item_vecs = torch.tensor([[3.0], [2.0], [1.0]])
    seen = Csr.from_pairs(np.array([1]), np.array([1]), 2)
    positives = Csr.from_pairs(np.array([1]), np.array([2]), 2)
    totals = rank_users(torch.ones(1, 1), np.array([1]), item_vecs, seen, positives, k=5)
    assert totals.recommended == 1 and totals.item_counts.tolist() == [0, 0, 1]
    got = totals.as_dict(5)
    assert got["coverage@5"] == 0.5 and got["popularity_rank@5"] == 2.0  # item 2: never rated, after item 1
    assert got["mrr@5"] == got["hit_rate@5"] == got["recall@5"] == 1.0


def _two_rank_evaluation(rank, data_dir, out):
    """On each rank: the distributed figures of a sharded model, and (rank 0) a single-process
    ranking of the same model's gathered vectors."""
    import json

    import torch.distributed as dist

    from tests.training.conftest import sharded_module
    from twotower_lit.config import OptimConfig
    from twotower_lit.data.datamodule import MovieLensDataModule
    from twotower_lit.evaluation import evaluate_retrieval, tower_matrix

    dm = MovieLensDataModule(data_dir, batch_size=256)
    dm.load()
    torch.manual_seed(0)
    lm = sharded_module(dm, OptimConfig(), dist.group.WORLD, sharding="table_wise")
    positives = dm.positives["test"]
    # an odd number of users: the ranks' slices differ in length (the last one padded)
    users = np.flatnonzero(positives.lengths() > 0).astype(np.int64)
    users = users[: len(users) - 1 + len(users) % 2]
    device = torch.device("cpu")
    with torch.no_grad():
        spread = evaluate_retrieval(lm, dm.builder, dm.num_items, users, dm.seen, positives, 10, 64, device)
        items = tower_matrix(lm, dm.builder, np.arange(dm.num_items, dtype=np.int64), "item", 64, device)
        user_vecs = tower_matrix(lm, dm.builder, users, "user", 64, device)
    if rank == 0:
        single = rank_users(user_vecs, users, items, dm.seen, positives, 10)
        (out / "result.json").write_text(json.dumps({"spread": spread.as_dict(10), "single": single.as_dict(10),
                                                     "spread_counts": spread.item_counts.tolist(),
                                                     "single_counts": single.item_counts.tolist()}))


def test_two_ranks_give_the_single_process_figures_coverage_from_the_union(prepared_synthetic, tmp_path):
    """Two gloo ranks each rank half the users: every metric, and coverage (the union of what both
    recommended, not the sum of their coverages), equals one process ranking every user."""
    import json

    from tests.ranks import run_ranks

    run_ranks(_two_rank_evaluation, 2, tmp_path, str(prepared_synthetic), tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    spread, single = result["spread"], result["single"]
    assert spread["ranked_users"] == single["ranked_users"] > 100 and single["ranked_users"] % 2 == 1
    for name, value in single.items():
        assert spread[name] == pytest.approx(value, abs=1e-9), name
    assert result["spread_counts"] == result["single_counts"]
    assert 0 < single["coverage@10"] < 1
