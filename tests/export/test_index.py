"""Search indexes built into an export (`twotower_lit.export.index`): under every index the seen items
are excluded and k items come back, with exact scores; the recall stored at build time is the recall
served; a tampered index file is refused before faiss reads it; the CLI and the server's /ping."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("faiss")

from twotower_lit.export.format import ArtifactError, load_export  # noqa: E402
from twotower_lit.export.index import build_index  # noqa: E402
from twotower_lit.serving.recommender import Recommender  # noqa: E402
from twotower_lit.serving.request import RecommendRequest, UserQuery  # noqa: E402
from twotower_lit.export.search import INDEX_META, open_search  # noqa: E402
from twotower_lit.serving.synthetic import random_export  # noqa: E402
from tests.serving.conftest import ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
USERS, ITEMS, SEEN = 60, 2000, 300
# name -> (kind, vector dtype, parameters): small graphs and few probed lists, so that the seen
# items crowd the candidates and the over-fetch, the filter and the exact fallback all do work
INDEXES = {"exact-int8": ("exact", "int8", {}), "hnsw": ("hnsw", "fp32", {"M": 8, "efSearch": 16}),
           "hnsw-fp16": ("hnsw", "fp16", {}), "ivf": ("ivf", "fp32", {"nlist": 40, "nprobe": 8}),
           "ivf-int8": ("ivf", "int8", {"nlist": 40, "nprobe": 1})}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("index") / "model")
    random_export(model_dir, num_users=USERS, num_items=ITEMS, embedding_dim=8, user_layers=(16,),
                  seen_per_user=SEEN, item_clusters=50, seed=3)
    entries = {}
    for name, (kind, dtype, params) in INDEXES.items():
        entries[name] = build_index(model_dir, kind, params, dtype, recall_users=USERS, default=name == "hnsw",
                                    threads=1, log=lambda line: None)
    return model_dir, entries


def _ask(rec, k, users=range(1, USERS + 1)):
    return rec.recommend(RecommendRequest(tuple(UserQuery(user_id=u) for u in users), k=k, exclude_seen=True))


@pytest.mark.parametrize("name", ["exact", *INDEXES])
def test_every_index_excludes_seen_items_and_returns_k_with_exact_scores(indexed, name):
    model_dir, _ = indexed
    exported = load_export(model_dir)
    rec = Recommender(exported, name, model_dir)
    assert rec.search.describe()["kind"] == name.split("-")[0]
    k = 25
    for r in _ask(rec, k):
        index = rec.user_index[r.user_id]
        seen = set((exported.seen(index) - 1).tolist())
        assert len(r.columns) == k and len(set(r.columns)) == k
        assert not seen & set(r.columns), f"{name}: a seen item was recommended"
        truth = exported.user_vectors(exported.user_features[index:index + 1])[0] @ exported.item_vectors.t()
        np.testing.assert_allclose(r.scores, truth[r.columns].numpy(), rtol=1e-5, atol=1e-6)
        assert r.scores == sorted(r.scores, reverse=True)
    described = rec.search.describe()
    if name != "exact":
        assert described["seen_filtered"] > 0, described  # the over-fetched seen items were counted


def test_recall_stored_at_build_is_the_recall_served(indexed):
    model_dir, entries = indexed
    exported = load_export(model_dir)
    exact = _ask(Recommender(exported, "exact"), 10)
    meta = json.loads(Path(model_dir, INDEX_META).read_text())
    assert meta["default"] == "hnsw" and set(meta["indexes"]) == set(INDEXES)
    for name in INDEXES:
        served = _ask(Recommender(exported, name, model_dir), 10)
        recall = np.mean([len(set(a.columns) & set(b.columns)) / len(b.columns) for a, b in zip(served, exact)])
        assert meta["indexes"][name]["recall_at_10"] == pytest.approx(recall, abs=1e-4), name
        assert meta["indexes"][name]["recall_users"] == USERS and meta["indexes"][name]["bytes"] > 0
    assert meta["indexes"]["hnsw-fp16"]["recall_at_10"] >= 0.95
    assert meta["indexes"]["exact-int8"]["recall_at_10"] >= 0.95


def test_short_candidate_lists_fall_back_to_exact_search(indexed):
    """One probed list (of 2,000 items in 40 lists) cannot hold 400 unseen candidates: every user
    is answered by exact search (and counted), so gets exactly what exact search gives."""
    model_dir, _ = indexed
    exported = load_export(model_dir)
    rec = Recommender(exported, "ivf-int8", model_dir)
    got = _ask(rec, 400)
    assert rec.search.describe()["exact_fallbacks"] == USERS
    assert [r.columns for r in got] == [r.columns for r in _ask(Recommender(exported, "exact"), 400)]


def test_a_tampered_or_missing_index_is_refused_naming_it(indexed, tmp_path):
    model_dir, entries = indexed
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    path = copy / entries["hnsw"]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    exported = load_export(model_dir)
    with pytest.raises(ArtifactError, match=r"index-hnsw\.faiss: sha256 does not match"):
        open_search("hnsw", exported, str(copy))
    with pytest.raises(ArtifactError, match=r"no 'hnsw-int8' index \(it has: .*hnsw"):
        open_search("hnsw-int8", exported, model_dir)
    proc = subprocess.run([sys.executable, "-m", "entrypoints.serve", "--model-dir", str(copy), "--port", "1"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "index-hnsw.faiss: sha256 does not match" in proc.stderr, proc.stderr[-2000:]


def test_index_cli_builds_into_the_export_and_names_bad_parameters(tmp_path):
    model_dir = str(tmp_path / "model")
    random_export(model_dir, num_users=20, num_items=500, embedding_dim=8, user_layers=(16,), seed=1)
    run = [sys.executable, "-m", "entrypoints.index", "--model-dir", model_dir, "--threads", "1"]
    proc = subprocess.run(run + ["--index", "ivf", "--vector-dtype", "fp16", "--param", "nprobe=4"], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = json.loads(proc.stdout)
    assert entry["kind"] == "ivf" and entry["factory"].endswith("SQfp16") and entry["params"]["nprobe"] == 4
    assert 0 < entry["recall_at_10"] <= 1 and "recall@10" in proc.stderr
    manifest = json.loads(Path(model_dir, "manifest.json").read_text())
    assert {INDEX_META, entry["file"]} <= set(manifest["files"])
    load_export(model_dir)  # every listed file still checks out
    bad = subprocess.run(run + ["--index", "hnsw", "--param", "bogus=3"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown parameter(s) bogus" in bad.stderr, bad.stderr


def test_ping_names_the_index_that_answers(indexed, tmp_path):
    model_dir, entries = indexed
    server = ServerProcess(["--model-dir", model_dir], tmp_path / "server.log")  # --search auto: the default index
    try:
        r = httpx.post(server.url + "/invocations", json={"user_id": 5, "k": 10}, timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"][0]["items"]) == 10
        search = httpx.get(server.url + "/ping").json()["search"]
    finally:
        server.stop()
    assert search["name"] == "hnsw" and search["kind"] == "hnsw"
    assert search["recall_at_10"] == entries["hnsw"]["recall_at_10"] and search["queries"] == 1


def test_a_packaged_export_with_an_index_requires_the_locked_faiss(indexed, tmp_path):
    import re
    import tarfile

    from twotower_lit.serving.package import package_model

    model_dir, entries = indexed
    with tarfile.open(package_model(model_dir, str(tmp_path / "model.tar.gz"))) as tar:
        names = set(tar.getnames())
        requirements = tar.extractfile("code/requirements.txt").read().decode()
    assert {INDEX_META, entries["hnsw"]["file"], "code/twotower_lit/export/search.py"} <= names
    locked = re.search(r"^faiss-cpu==\S+$", (REPO / "requirements" / "base.txt").read_text(), re.M).group(0)
    assert locked in requirements.splitlines()
