"""Training checked against oracles that share no code with it.

A two-process (gloo) run of the real training command on a small synthetic set; then its figures
are recomputed here from its files alone: the prepared splits read with pyarrow, the exported
weights with safetensors' numpy loader, the user tower run in numpy, full ranking and the
Mann-Whitney AUC written out in numpy. Another run of the code is never the reference.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.numpy_export import NumpyModel
from tests.training.conftest import prepare_synthetic, read_json, run_cli

K = 10


@pytest.fixture(scope="module")
def two_rank_run(synthetic_movielens, tmp_path_factory):
    prepared = prepare_synthetic(synthetic_movielens, tmp_path_factory, 8_000, seed=3)
    out = tmp_path_factory.mktemp("oracle") / "out"
    run_cli("entrypoints.train", ["--data-dir", str(prepared), "--output-dir", str(out), "--accelerator", "cpu",
                                  "--devices", "2", "--max-epochs", "1", "--batch-size", "256", "--negatives", "1",
                                  "--progress", "false", "--mlflow-uri", "none"])
    return prepared, out


def split_rows(prepared: Path, split: str) -> dict:
    files = sorted((prepared / split).glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return {c: table.column(c).to_numpy() for c in ("user", "item", "label")}


def mann_whitney_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # tied scores share their mean rank
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_rows_of_the_prepared_splits_are_the_rated_pairs_of_the_raw_file(two_rank_run, synthetic_movielens):
    """Row counts: every raw rating ends in exactly one split (the synthetic set has no bad lines,
    and the manifest's counts are what the files hold)."""
    prepared, _ = two_rank_run
    manifest = read_json(prepared / "manifest.json")
    raw_lines = (synthetic_movielens("ml-1m", 8_000, seed=3) / "ratings.dat").read_bytes().count(b"\n")
    sizes = {s: len(split_rows(prepared, s)["user"]) for s in ("train", "val", "test")}
    counts = manifest["counts"]
    assert sizes == {s: counts[s] for s in sizes}
    assert sum(sizes.values()) + counts["duplicates"] + counts.get("neutral_dropped", 0) == raw_lines == 8_000


def test_two_rank_test_metrics_equal_a_numpy_ranking_of_the_export(two_rank_run):
    """Recall@10 / NDCG@10 of metrics.json (computed during training, spread over two ranks) equal a
    full ranking of the exported vectors in numpy: every real item but the user's training items,
    hits against the test split's label-1 pairs, users without one not counted."""
    prepared, out = two_rank_run
    model = NumpyModel(str(out / "model"))
    train, test = split_rows(prepared, "train"), split_rows(prepared, "test")
    seen: dict = {}
    for u, i in zip(train["user"].tolist(), train["item"].tolist()):
        seen.setdefault(u, set()).add(i)
    positives: dict = {}
    for u, i, y in zip(test["user"].tolist(), test["item"].tolist(), test["label"].tolist()):
        if y > 0.5:
            positives.setdefault(u, set()).add(i)
    users = np.array(sorted(positives))
    scores = model.users(users) @ model.items.T  # column c is item index c + 1
    recalls, ndcgs = [], []
    for row, u in enumerate(users.tolist()):
        s = scores[row].copy()
        s[[i - 1 for i in seen.get(u, ())]] = -np.inf
        top = [int(c) + 1 for c in np.argsort(-s, kind="stable")[:K]]
        hits = [1.0 if i in positives[u] else 0.0 for i in top]
        recalls.append(sum(hits) / len(positives[u]))
        ideal = sum(1 / math.log2(r + 2) for r in range(min(len(positives[u]), K)))
        ndcgs.append(sum(h / math.log2(r + 2) for r, h in enumerate(hits)) / ideal)
    got = read_json(out / "metrics.json")["test"]
    assert len(users) > 50
    assert got["recall@10"] == pytest.approx(np.mean(recalls), abs=1e-5)
    assert got["ndcg@10"] == pytest.approx(np.mean(ndcgs), abs=1e-5)


def test_two_rank_test_auc_and_logloss_equal_numpy_figures_of_the_export(two_rank_run):
    """AUC (Mann-Whitney) and log-loss of every test row's liking probability, sigmoid of the dot
    product of the vectors without their last exposure_dims dimensions."""
    prepared, out = two_rank_run
    model = NumpyModel(str(out / "model"))
    test = split_rows(prepared, "test")
    width = model.items.shape[1] - int(model.config.get("exposure_dims", 0))
    user_vecs = model.users(test["user"].astype(np.int64))[:, :width]
    logits = (user_vecs * model.items[test["item"].astype(np.int64) - 1, :width]).sum(1)
    p = np.clip(1 / (1 + np.exp(-logits)), 1e-7, 1 - 1e-7)
    y = test["label"].astype(np.float64)
    got = read_json(out / "metrics.json")["test"]
    assert got["auc"] == pytest.approx(mann_whitney_auc(logits, y), abs=1e-4)
    assert got["logloss"] == pytest.approx(float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()), abs=1e-4)
    assert got["accuracy"] == pytest.approx(float(((p >= 0.5) == (y > 0.5)).mean()), abs=1e-4)
