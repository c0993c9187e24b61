"""The synthetic generator: realistic shape, determinism, every layout readable, and a signal
beyond popularity (what the training tests rely on)."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_lit.config import PrepareConfig
from twotower_lit.data import schema
from twotower_lit.data.features import MOVIELENS_GENRES
from twotower_lit.data.layouts import layout_for
from twotower_lit.data.prepare import prepare_dataset
from twotower_lit.data.readers import read_movies, read_ratings, read_users
from twotower_lit.data.synthetic import RATING_SHARES, generate_movielens
from twotower_lit.data.validation import BadLineReport


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    s = score[order]
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts, ends = np.r_[0, boundaries], np.r_[boundaries, len(s)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    pos = label == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_shape_like_movielens(synthetic_movielens):
    raw = synthetic_movielens("ml-1m", 200_000)
    lay = layout_for("ml-1m")
    r = read_ratings(str(raw), lay, "error", BadLineReport())
    assert len(r) == 200_000
    per_user = np.bincount(r.user_id)[1:]
    assert per_user.min() >= 20 and per_user.max() > 5 * np.median(per_user)  # long tail of heavy users
    pairs = r.user_id * (r.item_id.max() + 1) + r.item_id
    assert len(np.unique(pairs)) == len(pairs)  # no duplicate (user, item)
    shares = np.bincount(r.rating.astype(int), minlength=6)[1:] / len(r)
    np.testing.assert_allclose(shares, RATING_SHARES, atol=0.01)
    pop = np.sort(np.bincount(r.item_id))[::-1]
    assert pop[: len(pop) // 10].sum() > 0.35 * len(r)  # Zipf-like: top 10% of items hold a big share
    assert r.timestamp.min() >= 956_703_932 and r.timestamp.max() <= 1_046_454_590  # ml-1m's window
    movies = read_movies(str(raw), lay, "error", BadLineReport())
    genres = {g for m in movies.values() for g in m["genres"]}
    assert genres <= set(MOVIELENS_GENRES) and len(genres) >= 15
    assert all(1919 <= m["year"] <= 2023 for m in movies.values())
    assert any("," in m["title"] for m in movies.values()) and any("é" in m["title"] for m in movies.values())
    users = read_users(str(raw), lay, "error", BadLineReport())
    assert set(users) == set(np.unique(r.user_id))


@pytest.mark.parametrize("layout", ["ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m", "ml-latest",
                                    "ml-latest-small"])
def test_every_layout_is_written_and_read_back(layout, tmp_path):
    generate_movielens(str(tmp_path / layout), 2500, layout, seed=1, log=None)
    m = prepare_dataset(PrepareConfig(data_dir=str(tmp_path / layout), dataset=layout, min_shards=1),
                        str(tmp_path / "out"), log=lambda _: None)
    assert m["counts"]["raw_rows"] == 2500 and m["counts"]["skipped"] == {}
    assert m["counts"]["ratings_item_not_in_movies"] == 0


def test_seeded_and_reused(tmp_path):
    a = generate_movielens(str(tmp_path / "a"), 5000, "ml-32m", seed=3, log=None)
    generate_movielens(str(tmp_path / "b"), 5000, "ml-32m", seed=3, log=None)
    generate_movielens(str(tmp_path / "c"), 5000, "ml-32m", seed=4, log=None)

    def digest(d):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((tmp_path / d).iterdir())}

    assert digest("a") == digest("b") and digest("a")["ratings.csv"] != digest("c")["ratings.csv"]
    mtime = (tmp_path / "a" / "ratings.csv").stat().st_mtime_ns
    assert generate_movielens(str(tmp_path / "a"), 5000, "ml-32m", seed=3, log=None) == a
    assert (tmp_path / "a" / "ratings.csv").stat().st_mtime_ns == mtime  # same spec: not rewritten


def test_signal_beyond_popularity(synthetic_movielens, tmp_path):
    """A personalised predictor fitted on train beats item popularity on test: ratings depend on
    the user (genre taste), not only on the item."""
    raw = synthetic_movielens("ml-1m", 200_000)
    prepare_dataset(PrepareConfig(data_dir=str(raw), min_shards=1), str(tmp_path / "out"), log=lambda _: None)

    def load(split):
        t = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / split).glob("*.parquet"))])
        return t["user"].to_numpy(), t["item"].to_numpy(), t["label"].to_numpy()

    items = pq.read_table(tmp_path / "out" / schema.ITEMS_FILE)
    n_items, n_genres = items.num_rows + 1, 19
    hot = np.zeros((n_items, n_genres))
    for idx, genres in zip(items["item"].to_numpy(), items["genres"].to_pylist()):
        hot[idx, genres] = 1.0 / max(1, len(genres))
    (u, i, y), (tu, ti, ty) = load("train"), load("test")
    n_users = max(u.max(), tu.max()) + 1
    popularity = np.bincount(i, minlength=n_items).astype(float)
    item_mean = (np.bincount(i, y, n_items) + 0.5 * 5) / (popularity + 5)  # shrunk to 0.5
    resid = y - item_mean[i]
    taste = np.zeros((n_users, n_genres))
    weight = np.zeros((n_users, n_genres))
    np.add.at(taste, u, hot[i] * resid[:, None])
    np.add.at(weight, u, hot[i])
    taste /= weight + 2.0
    personal = item_mean[ti] + (hot[ti] * taste[tu]).sum(1)
    auc_pop, auc_item, auc_personal = _auc(popularity[ti], ty), _auc(item_mean[ti], ty), _auc(personal, ty)
    print(f"AUC popularity {auc_pop:.3f} item-mean {auc_item:.3f} personal {auc_personal:.3f}")
    assert auc_pop > 0.55  # popularity means something (quality is correlated with it)
    assert auc_personal > auc_item > auc_pop
    assert auc_personal - auc_pop > 0.05



def test_which_movies_a_user_rates_depends_on_the_user(synthetic_movielens, tmp_path):
    """Recall@10 beyond popularity: ranking movies by their co-occurrence with the user's training
    movies (item-based collaborative filtering) finds more of the user's liked test movies than
    popularity does. A generator whose users all pick movies by popularity alone gives a
    personalised ranker nothing to find, and a trained model then loses to popularity on Recall@10."""
    raw = synthetic_movielens("ml-1m", 200_000)
    prepare_dataset(PrepareConfig(data_dir=str(raw), min_shards=1), str(tmp_path / "out"), log=lambda _: None)

    def load(split):
        t = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / split).glob("*.parquet"))])
        return t["user"].to_numpy(), t["item"].to_numpy(), t["label"].to_numpy()

    (u, i, _), (tu, ti, ty) = load("train"), load("test")
    n_users = max(u.max(), tu.max()) + 1
    n_items = pq.read_table(tmp_path / "out" / schema.ITEMS_FILE).num_rows + 1
    seen = np.zeros((n_users, n_items), np.float32)
    seen[u, i] = 1.0
    liked = np.zeros((n_users, n_items), bool)
    liked[tu[ty == 1], ti[ty == 1]] = True
    rows = np.flatnonzero(liked.any(1))
    popularity = seen.sum(0)
    norm = np.sqrt(np.maximum(popularity, 1.0))
    cosine = (seen.T @ seen) / norm[:, None] / norm[None, :]
    np.fill_diagonal(cosine, 0.0)

    def recall_at_10(score):
        score = np.where(seen[rows] > 0, -np.inf, score)
        top = np.argsort(-score, 1)[:, :10]
        hits = np.take_along_axis(liked[rows], top, 1).sum(1)
        return float(np.mean(hits / np.minimum(liked[rows].sum(1), 10)))

    pop = recall_at_10(np.broadcast_to(popularity, (len(rows), n_items)).copy())
    item_knn = recall_at_10(seen[rows] @ cosine)
    print(f"Recall@10 popularity {pop:.3f} item-based CF {item_knn:.3f}")
    assert item_knn > 1.15 * pop
