"""The best epoch is tested and exported, early stopping, and a resumed run keeping the best so far:
real training runs on a small synthetic set whose later epochs overfit, and the choice itself."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.training.conftest import prepare_synthetic, read_json, run_cli

# ids only, BCE, a high embedding learning rate: on this set validation Recall@10 peaks at epoch 2
# of 4 and falls after it (AUC too), so the best epoch is not the last one
OVERFITS = ["--batch-size", "256", "--progress", "false", "--mlflow-uri", "none", "--side-features", "false",
            "--loss", "bce", "--embedding-lr", "1", "--dense-lr", "0.01", "--max-epochs", "4",
            "--early-stopping-patience", "1"]


@pytest.fixture(scope="module")
def small_prepared(synthetic_movielens, tmp_path_factory) -> Path:
    return prepare_synthetic(synthetic_movielens, tmp_path_factory, 12_000, seed=2)


@pytest.fixture(scope="module")
def stopped_run(small_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("best") / "out"
    proc = run_cli("entrypoints.train", ["--data-dir", str(small_prepared), "--output-dir", str(out), *OVERFITS])
    return out, proc


def test_the_best_epoch_is_tested_and_exported_and_training_stops_after_patience(stopped_run, small_prepared):
    from twotower_lit.export.evaluate import evaluate_model_dir

    out, proc = stopped_run
    train = read_json(out / "metrics.json")["train"]
    history = {h["epoch"]: h for h in train["val_history"]}
    recall = {e: h["val_recall_at_10"] for e, h in history.items()}
    best = max(recall, key=recall.get)
    # the run this test needs: a later epoch is worse than an earlier one
    assert best < max(recall) and recall[max(recall)] < recall[best] - 1e-3
    assert train["best_epoch"] == best and train["best_metric"] == "val_recall_at_10"
    assert train["best_value"] == recall[best]
    # patience 1: the first epoch after the best without a new best ends the run, before --max-epochs 4
    assert train["stopped_early"] and train["epochs"] == best + 1 == len(history) < 4
    # the export is the best epoch's model: its validation figures are that epoch's, not the last one's
    exported = evaluate_model_dir(str(out / "model"), str(small_prepared), "val")
    assert exported["recall@10"] == pytest.approx(recall[best], abs=2e-4)
    assert exported["auc"] == pytest.approx(history[best]["val_auc"], abs=2e-4)
    assert abs(exported["recall@10"] - recall[max(recall)]) > 1e-3
    lines = proc.stdout.splitlines()
    assert f"tested and exported: epoch {best} of {best + 1}, the best by val_recall_at_10 ({recall[best]:.4f}, " \
           f"val AUC {history[best]['val_auc']:.4f}), stopped early: no better epoch in the last ones " \
           f"(--early-stopping-patience)" in lines


def test_sagemaker_reads_each_epochs_validation_line_and_last_the_best_epochs(stopped_run):
    """The job's metric definitions find one value per epoch, then the exported epoch's again: a
    tuning job's objective is the last value it reads."""
    from twotower_lit.aws.hyperparameters import metric_definitions

    out, proc = stopped_run
    train = read_json(out / "metrics.json")["train"]
    regex = {m["Name"]: m["Regex"] for m in metric_definitions(10)}
    for name, key in (("val:recall@10", "val_recall_at_10"), ("val:auc", "val_auc")):
        values = [float(m.group(1)) for line in proc.stdout.splitlines() if (m := re.search(regex[name], line))]
        expected = [h[key] for h in train["val_history"]] + [train["val_history"][train["best_epoch"] - 1][key]]
        assert values == pytest.approx(expected, abs=1e-4), name


def test_a_resumed_run_keeps_the_best_epoch_trained_before_it(stopped_run, small_prepared, tmp_path):
    """Resumed after the best epoch, on two processes: the record of the epochs before the
    checkpoint comes back with it, so the run still stops one epoch later and both ranks load the
    best epoch from the first run's checkpoint (resharded) to test and export it. Without the record
    the resumed epoch would be the best, and the run would go on."""
    first, _ = stopped_run
    reference = read_json(first / "metrics.json")
    best = reference["train"]["best_epoch"]
    (checkpoint,) = (first / "checkpoints").glob(f"epoch{best - 1}-end-*")
    out = tmp_path / "resumed"
    run_cli("entrypoints.train", ["--data-dir", str(small_prepared), "--output-dir", str(out), *OVERFITS,
                                  "--resume", str(checkpoint), "--accelerator", "cpu", "--devices", "2",
                                  "--registered-model-name", ""])
    got = read_json(out / "metrics.json")
    assert got["train"]["world_size"] == 2
    assert got["train"]["best_epoch"] == best and got["train"]["stopped_early"]
    assert got["train"]["epochs"] == reference["train"]["epochs"]
    assert [h["epoch"] for h in got["train"]["val_history"]] == [h["epoch"] for h in reference["train"]["val_history"]]
    # (the same weights; two ranks sum their figures in another order)
    for key, value in reference["test"].items():
        assert got["test"][key] == pytest.approx(value, abs=2e-4), key


def _record(metric="recall", tolerance=0.005, history=()):
    from twotower_lit.training.callbacks import BestEpoch

    record = BestEpoch(metric, 10, tolerance, 0, epoch_checkpoint=None)
    record.history = [{"epoch": e, "val_recall_at_10": r, "val_auc": a, "val_logloss": ll}
                      for e, (r, a, ll) in enumerate(history, start=1)]
    return record


def test_best_epoch_by_recall_among_epochs_within_the_auc_guard():
    # epoch 2 has the best recall while AUC is still rising; once epoch 4's AUC is 0.02 higher, epoch
    # 2 is outside a 0.005 guard, and the best recall among epochs 3-5 (AUC within 0.005 of 0.80) wins
    rising = [(0.20, 0.70, 0.6), (0.25, 0.75, 0.55), (0.22, 0.796, 0.5), (0.21, 0.80, 0.52), (0.23, 0.797, 0.53)]
    assert _record(history=rising[:2]).best()["epoch"] == 2
    assert _record(history=rising).best()["epoch"] == 5
    assert _record(history=rising, tolerance=-1).best()["epoch"] == 2  # no guard
    assert _record(history=rising, tolerance=0.1).best()["epoch"] == 2
    assert _record("logloss", history=rising).best()["epoch"] == 3  # minimised
    assert _record("auc", history=rising).best()["epoch"] == 4
    assert _record("last", history=rising).best()["epoch"] == 5
    # the earliest of equal figures; a diverged epoch (nan) is never the best
    assert _record(history=[(0.2, 0.7, 0.5), (0.2, 0.7, 0.5)]).best()["epoch"] == 1
    assert _record(history=[(0.2, 0.7, 0.5), (math.nan, math.nan, math.nan)]).best()["epoch"] == 1
    assert _record(history=[(math.nan, 0.7, 0.5)]).best() is None
    assert _record(history=[]).best() is None


def test_early_stopping_options_are_checked():
    from twotower_lit.training.callbacks import BestEpoch

    with pytest.raises(ValueError, match="--early-stopping-patience -1: give a number of epochs >= 1, or 0 for off"):
        BestEpoch("recall", 10, 0.005, -1, None)
    with pytest.raises(ValueError, match="needs a --best-metric to judge epochs by, not 'last'"):
        BestEpoch("last", 10, 0.005, 2, None)
