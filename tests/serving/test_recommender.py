"""The recommender against a brute-force reference on a random export."""
import math

import numpy as np
import pytest
import torch

from twotower_lit.config import ServeConfig
from twotower_lit.data.features import encode_user_features
from twotower_lit.export.format import load_export
from twotower_lit.serving import handler
from twotower_lit.serving.recommender import COLD_START, MODEL, POPULARITY, Recommender
from twotower_lit.serving.request import RecommendRequest, UserQuery


@pytest.fixture(scope="module")
def exported(model_dir):
    return load_export(model_dir)


def reference_topk(exported, features_row, k, exclude_cols=()):
    vec = exported.user_tower(features_row.unsqueeze(0))[0].detach().numpy()
    scores = exported.item_vectors.numpy() @ vec
    scores[list(exclude_cols)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(c) for c in order if np.isfinite(scores[c])], scores


def test_known_user_exact_topk_excludes_seen(exported):
    rec = Recommender(exported)
    index = rec.user_index[7]
    seen = (exported.seen(index) - 1).tolist()
    assert seen, "the fixture gives every user seen items"
    out = rec.recommend(RecommendRequest((UserQuery(user_id=7),), k=15, exclude_seen=True))[0]
    expected, scores = reference_topk(exported, exported.user_features[index], 15, seen)
    assert out.source == MODEL
    assert out.columns == expected
    assert not set(out.columns) & set(seen)
    np.testing.assert_allclose(out.scores, scores[expected], rtol=1e-5, atol=1e-6)


def test_exclude_seen_false_ranks_everything(exported):
    rec = Recommender(exported)
    index = rec.user_index[7]
    out = rec.recommend(RecommendRequest((UserQuery(user_id=7),), k=exported.num_items, exclude_seen=False))[0]
    assert sorted(out.columns) == list(range(exported.num_items))
    seen = set((exported.seen(index) - 1).tolist())
    assert seen <= set(out.columns)


def test_k_larger_than_unseen_items_returns_only_unseen(exported):
    rec = Recommender(exported)
    index = rec.user_index[3]
    n_seen = len(exported.seen(index))
    out = rec.recommend(RecommendRequest((UserQuery(user_id=3),), k=exported.num_items, exclude_seen=True))[0]
    assert len(out.columns) == exported.num_items - n_seen
    assert all(math.isfinite(s) for s in out.scores)


def test_cold_start_uses_encode_user_features(exported):
    rec = Recommender(exported)
    raw = {"gender": "f", "age": 31, "occupation": "7", "zip": exported.vocab["zip"][2] + "99"}
    out = rec.recommend(RecommendRequest((UserQuery(user_id=10 ** 9, features=raw),), k=5))[0]
    encoded = encode_user_features(raw, exported.vocab, exported.config["zip_prefix"])
    assert all(v > 0 for v in encoded.values())
    row = torch.tensor([0 if n == "user" else encoded[n] for n in exported.config["user_features"]])
    expected, _ = reference_topk(exported, row, 5)
    assert (out.source, out.columns, out.user_id) == (COLD_START, expected, 10 ** 9)


def test_unknown_user_without_usable_features_gets_popularity(exported):
    rec = Recommender(exported)
    reqs = (UserQuery(user_id=10 ** 9), UserQuery(features={"zip": "not-a-zip", "gender": "X"}))
    outs = rec.recommend(RecommendRequest(reqs, k=4))
    order = torch.argsort(exported.popularity, descending=True, stable=True)[:4].tolist()
    for out in outs:
        assert (out.source, out.columns) == (POPULARITY, order)
        assert out.reason
    assert outs[0].scores == sorted(outs[0].scores, reverse=True)


def test_predict_payload_has_items_and_version(model_dir):
    model = handler.load_model(model_dir, ServeConfig())
    req = handler.decode(b'{"inputs": [1, 2], "k": 3}', "application/json", model.config)
    payload = handler.predict(req, model)
    assert payload["model_version"] == model.model_version and payload["k"] == 3
    items = model.recommender.model.items
    for p in payload["predictions"]:
        assert len(p["items"]) == 3
        for it in p["items"]:
            assert set(it) == {"id", "title", "genres", "score"}
            assert it in [dict(x, score=it["score"]) for x in items]
    assert handler.load_model(model_dir, ServeConfig()).model_version == model.model_version
    assert torch.get_num_threads() == 1


def test_faiss_inner_product_search_agrees_with_exact(exported):
    pytest.importorskip("faiss")
    exact, approx = Recommender(exported, "exact"), Recommender(exported, "faiss")
    req = RecommendRequest(tuple(UserQuery(user_id=u) for u in range(1, 21)), k=10)
    overlaps = [len(set(a.columns) & set(b.columns)) / 10 for a, b in zip(exact.recommend(req), approx.recommend(req))]
    assert np.mean(overlaps) > 0.9
    for b in approx.recommend(req):
        seen = set((exported.seen(exact.user_index[b.user_id]) - 1).tolist())
        assert not seen & set(b.columns)
