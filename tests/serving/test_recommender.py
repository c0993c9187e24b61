"""The recommender against a brute-force reference on a random export. The reference reads the
export's files itself (safetensors' numpy loader, the JSON files) and runs the user tower in numpy,
so no part of the loader or the tower under test computes the expected answer."""
import math

import numpy as np
import pytest
import torch

from tests.conftest import missing_environment
from tests.numpy_export import NumpyModel
from twotower_lit.config import ServeConfig
from twotower_lit.data.features import encode_user_features
from twotower_lit.export.format import load_export
from twotower_lit.serving import handler
from twotower_lit.serving.recommender import COLD_START, MODEL, POPULARITY, Recommender
from twotower_lit.serving.request import RecommendRequest, UserQuery


@pytest.fixture(scope="module")
def exported(model_dir):
    return load_export(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return NumpyModel(model_dir)


def test_known_user_exact_topk_excludes_seen(exported, reference):
    rec = Recommender(exported)
    seen = reference.seen_columns(7)
    assert seen, "the fixture gives every user seen items"
    out = rec.recommend(RecommendRequest((UserQuery(user_id=7),), k=15, exclude_seen=True))[0]
    expected, scores = reference.topk(reference.features[reference.index[7]], 15, seen)
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


def test_cold_start_encodes_raw_features_by_the_vocabularies(exported, reference):
    """A cold-start user's raw values, encoded by hand: index = position in the export's vocabulary + 1
    (0 unknown); age 31 falls in ml-1m's 25-34 group; the zip code by its first zip_prefix (3) digits;
    the user id feature is unknown (0)."""
    rec = Recommender(exported)
    vocab = reference.vocab
    zip_code = vocab["zip"][2] + "99"
    raw = {"gender": "f", "age": 31, "occupation": "7", "zip": zip_code}
    out = rec.recommend(RecommendRequest((UserQuery(user_id=10 ** 9, features=raw),), k=5))[0]
    by_hand = {"user": 0, "gender": vocab["gender"].index("F") + 1, "age": vocab["age"].index(25) + 1,
               "occupation": vocab["occupation"].index("7") + 1, "zip": 3}
    assert encode_user_features(raw, exported.vocab, exported.config["zip_prefix"]) == \
        {k: v for k, v in by_hand.items() if k != "user"}
    row = [by_hand[n] for n in reference.config["user_features"]]
    expected, _ = reference.topk(row, 5)
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
    try:
        import faiss  # noqa: F401
    except ImportError:
        missing_environment("faiss", "faiss-cpu is not installed (the [serve] extra has it)")
    exact, approx = Recommender(exported, "exact"), Recommender(exported, "faiss")
    req = RecommendRequest(tuple(UserQuery(user_id=u) for u in range(1, 21)), k=10)
    overlaps = [len(set(a.columns) & set(b.columns)) / 10 for a, b in zip(exact.recommend(req), approx.recommend(req))]
    assert np.mean(overlaps) > 0.9
    for b in approx.recommend(req):
        seen = set((exported.seen(exact.user_index[b.user_id]) - 1).tolist())
        assert not seen & set(b.columns)
