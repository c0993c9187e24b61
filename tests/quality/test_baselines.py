"""Reference models (logistic regression on ids, matrix factorisation) and the quality benchmark's
baseline part, on a tiny synthetic prepared set."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twotower_lit.baselines import FitConfig, IdLogisticRegression, MatrixFactorization, evaluate, fit, \
    train_and_evaluate
from twotower_lit.data.datamodule import MovieLensDataModule


@pytest.fixture(scope="module")
def prepared(synthetic_movielens, tmp_path_factory):
    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.prepare import prepare_dataset

    raw = synthetic_movielens("ml-1m", 6000, seed=3)
    out = tmp_path_factory.mktemp("quality") / "prepared"
    prepare_dataset(PrepareConfig(data_dir=str(raw), min_shards=2), str(out), log=lambda *a, **k: None)
    dm = MovieLensDataModule(str(out))
    dm.load()
    return raw, dm


@pytest.mark.parametrize("cls", [IdLogisticRegression, MatrixFactorization])
def test_ranking_vectors_order_items_like_the_logit(cls):
    """Per user, <user vector, item vector> differs from the logit only by the user's own terms."""
    torch.manual_seed(0)
    model = cls(5, 7)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    users, items = torch.arange(5).repeat_interleave(7), torch.arange(7).repeat(5)
    logits = model(users, items)[0].view(5, 7).detach()
    uv, iv = model.ranking_vectors()
    diff = logits - uv @ iv.t()
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-5)


def test_fit_keeps_the_best_validation_epoch(prepared):
    _, dm = prepared
    model = MatrixFactorization(dm.num_users, dm.num_items, dim=8)
    info = fit(model, dm.splits["train"], dm.splits["val"], FitConfig(epochs=6, patience=2, lr=0.05))
    val = dm.splits["val"]
    with torch.no_grad():
        logits = model(torch.from_numpy(val["user"].astype(np.int64)),
                       torch.from_numpy(val["item"].astype(np.int64)))[0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(val["label"]))
    assert 1 <= info["best_epoch"] <= info["epochs"] <= 6
    assert float(loss) == pytest.approx(info["val_logloss"], rel=1e-5)  # the restored state is the best one


@pytest.mark.parametrize("name", ["logreg", "mf"])
def test_baselines_learn_and_report_the_shared_metrics(prepared, name):
    _, dm = prepared
    out = train_and_evaluate(name, dm, k=10, cfg=FitConfig(epochs=15))
    assert {"auc", "logloss", "accuracy", "recall@10", "ndcg@10", "ranked_users"} <= set(out)
    assert out["auc"] > 0.55  # the synthetic set has a learnable user x item signal
    assert 0.0 <= out["recall@10"] <= 1.0 and 0.0 <= out["ndcg@10"] <= 1.0 and out["ranked_users"] > 0
    # the same metric code as every other model: recompute AUC from the model directly
    same = evaluate(IdLogisticRegression(dm.num_users, dm.num_items), dm, "test", 10)
    assert same["auc"] == pytest.approx(0.5)  # an untrained (all-zero) model ranks nothing


def test_unknown_baseline_is_refused(prepared):
    with pytest.raises(ValueError, match="unknown baseline"):
        train_and_evaluate("deepfm", prepared[1])


def test_quality_benchmark_baseline_rows_for_both_protocols(prepared, tmp_path):
    """The benchmark's own CLI, baselines only (the two-tower rows are real training runs)."""
    from benchmarks.quality import main

    raw, _ = prepared
    out = tmp_path / "report"
    assert main(["--data", str(raw), "--models", "popularity,logreg", "--out", str(out),
                 "--work-dir", str(tmp_path / "work")]) == 0
    report = json.loads((out / "quality.json").read_text())
    rows = report["results"]
    assert [(r["protocol"], r["key"]) for r in rows] == [
        ("workshop", "popularity"), ("workshop", "logreg"), ("neutral-dropped", "popularity"),
        ("neutral-dropped", "logreg")]
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0 and 0.0 <= r["recall@10"] <= 1.0
    markdown = (out / "quality.md").read_text()
    assert "| ml-1m | neutral-dropped | logistic regression, user + item ids |" in markdown
    dropped = json.loads((tmp_path / "work" / "data" / f"{raw.name}-neutral-dropped-s0" / "manifest.json").read_text())
    assert dropped["options"]["neutral"] == "drop" and dropped["counts"]["neutral_dropped"] > 0
    assert report["seed"] == 0 and report["seeds"] == [0] and all(r["seed"] == 0 for r in rows)
    assert [s["n"] for s in report["summary"]] == [1] * 4 and "±" not in markdown


def test_quality_benchmark_several_seeds_mean_and_spread(prepared, tmp_path):
    """`--seeds 0,1`: one split and one run per seed, a summary of mean ± sd over them."""
    from benchmarks.quality import METRICS, main

    raw, _ = prepared
    out, work = tmp_path / "report", tmp_path / "work"
    assert main(["--data", str(raw), "--models", "popularity,logreg", "--seeds", "0,1", "--out", str(out),
                 "--work-dir", str(work)]) == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["seeds"] == [0, 1] and "seed" not in report
    rows = report["results"]
    cells = [(p, k) for p in ("workshop", "neutral-dropped") for k in ("popularity", "logreg")]
    assert sorted((r["protocol"], r["key"], r["seed"]) for r in rows) == sorted(
        (p, k, s) for p, k in cells for s in (0, 1))
    # each seed has its own split: prepared separately, with a different test set
    for protocol in ("workshop", "neutral-dropped"):
        seeds = [json.loads((work / "data" / f"{raw.name}-{protocol}-s{s}" / "manifest.json").read_text())
                 ["options"]["seed"] for s in (0, 1)]
        assert seeds == [0, 1]
        by_seed = {r["seed"]: r for r in rows if (r["protocol"], r["key"]) == (protocol, "popularity")}
        assert (by_seed[0]["auc"], by_seed[0]["recall@10"]) != (by_seed[1]["auc"], by_seed[1]["recall@10"])
    summary = report["summary"]
    assert [(s["protocol"], s["key"]) for s in summary] == cells
    for s in summary:
        per_seed = [r for r in rows if (r["protocol"], r["key"]) == (s["protocol"], s["key"])]
        assert s["n"] == 2 and s["dataset"] == "ml-1m"
        for m in METRICS:
            values = [r[m] for r in per_seed]
            assert s[m] == pytest.approx(sum(values) / 2)
            assert s[f"{m}_sd"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)  # sample sd of two
    markdown = (out / "quality.md").read_text()
    assert "±" in markdown and "Seeds 0, 1" in markdown and "## Per seed" in markdown
    assert "| ml-1m | neutral-dropped | logistic regression, user + item ids | 2 | " in markdown
    for s in (0, 1):
        assert f"| ml-1m | workshop | item popularity | {s} | " in markdown


def test_quality_benchmark_refuses_seed_and_seeds_together(tmp_path):
    from benchmarks.quality import main

    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path), "--seed", "1", "--seeds", "0,1", "--out", str(tmp_path / "report")])
    assert exc.value.code == 2
    assert not (tmp_path / "report").exists()
