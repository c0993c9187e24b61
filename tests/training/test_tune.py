"""entrypoints.tune: the search space file, median pruning on the validation metric, and a real
3-trial search on ml-100k (1 epoch each) whose best export then gives recommendations for every
user through entrypoints.recommend, checked against the real HTTP endpoint for sampled users."""
import json
import random
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import httpx
import optuna
import pytest
import torch

from tests.conftest import REAL_MOVIELENS, REPO
from twotower_lit.config import TrainConfig
from twotower_lit.options import from_dict
from twotower_lit.tuning.local import ValidationPruning
from twotower_lit.tuning.space import command_line, load_space, parameter_ranges, suggest


def test_the_search_space_names_training_options_and_both_routes_read_it():
    params = load_space()
    names = {p.name for p in params}
    assert {"embedding_lr", "dense_lr", "embedding_dim", "softmax_weight", "softmax_temperature", "exposure_dims",
            "vector_l2"} <= names
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):  # every sample builds a training config with the sampled values
        values = suggest(study.ask(), params)
        cfg = from_dict(TrainConfig, values)
        assert all(p.contains(values[p.name]) for p in params), values
        assert cfg.model.embedding_dim == values["embedding_dim"]
        assert command_line(values).startswith("python -m entrypoints.train --embedding-lr ")
    ranges = parameter_ranges(params)
    assert sum(len(v) for v in ranges.values()) == len(params)
    assert {"Name": "embedding_dim", "Values": ["32", "64", "128"]} in ranges["CategoricalParameterRanges"]
    lr = next(r for r in ranges["ContinuousParameterRanges"] if r["Name"] == "embedding_lr")
    assert lr["ScalingType"] == "Logarithmic" and float(lr["MinValue"]) < float(lr["MaxValue"])


@pytest.mark.parametrize("text, message", [
    ("parameters:\n  embeding_lr: {type: float, low: 0.01, high: 0.1}\n", "parameters.embeding_lr: not a training"),
    ("parameters:\n  dense_lr: {type: float, low: 0.1, high: 0.01}\n", "parameters.dense_lr: needs numbers low < high"),
    ("parameters:\n  dense_lr: {type: float, low: 0, high: 0.1, log: true}\n", "a log-scale range must be positive"),
    ("parameters:\n  embedding_dim: {type: categorical, choices: [32, x]}\n", "choices ['x'] are not of the option"),
    ("parameters:\n  dense_lr: {type: float, low: 0.1, high: 1, step: 2}\n", "unknown key(s) ['step']"),
    ("parameters: [1, 2]\n", "expected a mapping 'parameters'"),
    ("parameters: {a: [\n", "not valid YAML"),
])
def test_a_bad_search_space_is_refused_naming_the_parameter(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_space(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_a_trial_below_the_median_is_stopped_at_that_epoch():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for value in (0.30, 0.32):
        trial = study.ask()
        trial.report(value, step=0)
        study.tell(trial, value)
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, current_epoch=0,
                              callback_metrics={"val_recall_at_10": torch.tensor(0.10)})
    pruning = ValidationPruning(study.ask(), "val_recall@10")
    pruning.on_validation_end(trainer, None)
    assert trainer.should_stop and pruning.pruned_at == 0 and pruning.values == [pytest.approx(0.10)]
    above = SimpleNamespace(sanity_checking=False, should_stop=False, current_epoch=0,
                            callback_metrics={"val_recall_at_10": torch.tensor(0.50)})
    ValidationPruning(study.ask(), "val_recall@10").on_validation_end(above, None)
    assert not above.should_stop
    missing = SimpleNamespace(sanity_checking=False, should_stop=False, current_epoch=0,
                              callback_metrics={"val_auc": torch.tensor(0.7)})
    with pytest.raises(KeyError, match="val_recall_at_10.*val_auc"):
        ValidationPruning(study.ask(), "val_recall@10").on_validation_end(missing, None)


def test_a_trials_value_is_the_exported_epochs_not_the_last_ones():
    from twotower_lit.tuning.local import exported_value

    history = [{"epoch": 1, "val_recall_at_10": 0.20}, {"epoch": 2, "val_recall_at_10": 0.25},
               {"epoch": 3, "val_recall_at_10": 0.22}]
    values = [h["val_recall_at_10"] for h in history]
    metrics = {"train": {"best_epoch": 2, "val_history": history}}
    assert exported_value(metrics, "val_recall_at_10", values) == 0.25
    # no record of the exported epoch (or of that metric): the last validation's
    assert exported_value({"train": {"best_epoch": None, "val_history": history}}, "val_recall_at_10", values) == 0.22
    assert exported_value(metrics, "val_ndcg_at_10", values) == 0.22


@pytest.mark.timeout(900)
def test_three_trials_on_ml100k_then_every_users_recommendations_match_the_endpoint(tmp_path):
    from tests.serving.conftest import ServerProcess

    raw = REAL_MOVIELENS / "ml-100k"
    if not (raw / "u.data").exists():
        pytest.skip(f"real ml-100k not present at {raw} (set TWOTOWER_REAL_MOVIELENS to its parent folder)")
    out = tmp_path / "tune"
    argv = [sys.executable, "-m", "entrypoints.tune", "--data-dir", str(raw), "--trials", "3", "--max-epochs", "1",
            "--output-dir", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "tuning.json").read_text())
    trials = result["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3 and result["metric"] == "val_recall@10"
    assert trials[0]["baseline"] and trials[0]["params"]["embedding_lr"] == TrainConfig().optim.embedding_lr
    assert all(0 < t["value"] < 1 and set(t["test"]) >= {"auc", "recall@10"} for t in trials)
    best = max(trials, key=lambda t: t["value"])
    assert result["best"]["number"] == best["number"] and result["best"]["value"] == best["value"]
    assert f"best command line:\n  {result['best']['command']}" in proc.stdout
    assert result["best"]["command"].startswith(f"python -m entrypoints.train --data-dir {raw} --max-epochs 1 ")
    # each trial's MLflow run is nested under the search's run
    db = sqlite3.connect(out / "mlflow.db")
    parents = dict(db.execute("select run_uuid, value from tags where key = 'mlflow.parentRunId'").fetchall())
    db.close()
    assert sorted(parents) == sorted(t["mlflow_run_id"] for t in trials)
    assert set(parents.values()) == {result["mlflow_parent_run_id"]}

    # the same command again: the study is complete, nothing runs, the results stay
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming study" in again.stdout and "trial 3" not in again.stdout
    assert json.loads((out / "tuning.json").read_text())["trials"] == trials

    # recommendations for every ml-100k user from the best export, and the endpoint's for some of them
    model_dir = result["best"]["output_dir"] + "/model"
    recs = tmp_path / "recs.parquet"
    done = subprocess.run([sys.executable, "-m", "entrypoints.recommend", "--model-dir", model_dir, "--output",
                           str(recs), "--k", "20", "--progress", "false"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    users = len({line.split("\t")[0] for line in (raw / "u.data").read_text().splitlines() if line.strip()})
    assert summary["users"] == users and summary["rows"] == users * 20 and summary["by_source"]["model"] == users
    from twotower_lit.batch import read_recommendations

    rows = {}
    for row in read_recommendations(str(recs))[0].to_pylist():
        rows.setdefault(row["user_id"], []).append(row)
    server = ServerProcess(["--model-dir", model_dir], tmp_path / "server.log")
    try:
        for user in random.Random(0).sample(sorted(rows), 12):
            answer = httpx.post(server.url + "/invocations", json={"user_id": user, "k": 20}, timeout=30).json()
            items = answer["predictions"][0]["items"]
            assert [r["item_id"] for r in rows[user]] == [i["id"] for i in items], user
            assert [r["score"] for r in rows[user]] == pytest.approx([i["score"] for i in items], abs=2e-6)
    finally:
        server.stop()
