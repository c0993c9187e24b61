"""TrainConfig <-> SageMaker hyperparameters: the one mapping, and what each SDK delivers to the script."""
import json

import pytest

from entrypoints.train import parse_args
from twotower_lit.aws.hyperparameters import (CONTAINER_FIELDS, container_argv, from_hyperparameters,
                                              metric_definitions, to_hyperparameters)
from twotower_lit.config import TrainConfig
from twotower_lit.options import replace_options, to_flat_dict


def custom_config() -> TrainConfig:
    cfg = replace_options(TrainConfig(), max_epochs=3, batch_size=512, negatives=2, sharding="row_wise",
                          registered_model_name="",
                          mlflow_uri="arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/tt",
                          progress=False, output_dir="/somewhere/local", devices=4)
    cfg.model.user_layers = [64, 32]
    cfg.model.item_layers = [64, 32]
    cfg.model.side_features = False
    cfg.optim.dense_lr = 0.0005
    cfg.prepare.neutral = "drop"
    return cfg


def test_only_non_default_non_container_options_are_sent_as_strings():
    cfg = custom_config()
    hps = to_hyperparameters(cfg)
    assert hps == {"max_epochs": "3", "batch_size": "512", "negatives": "2", "sharding": "row_wise",
                   "registered_model_name": "", "mlflow_uri": cfg.tracking.mlflow_uri, "user_layers": "64,32",
                   "item_layers": "64,32", "side_features": "false", "dense_lr": "0.0005", "neutral": "drop"}
    assert not CONTAINER_FIELDS & set(hps)
    assert to_hyperparameters(TrainConfig()) == {}


def test_round_trip_restores_every_sent_option():
    cfg = custom_config()
    back = from_hyperparameters(to_hyperparameters(cfg))
    sent, got, default = to_flat_dict(cfg), to_flat_dict(back), to_flat_dict(TrainConfig())
    for name in sent:
        assert got[name] == (default[name] if name in CONTAINER_FIELDS else sent[name]), name


@pytest.mark.parametrize("sdk", ["v2", "v3"])
def test_what_the_container_passes_to_train_py_parses_back(sdk):
    """The SDKs store the strings (v2 JSON-encodes them), the container turns them into
    ``--snake_case value`` arguments; entrypoints.train must read them back unchanged."""
    cfg = custom_config()
    hps = to_hyperparameters(cfg)
    stored = {k: json.dumps(v) for k, v in hps.items()} if sdk == "v2" else hps
    parsed = parse_args(container_argv(hps, sdk))
    assert from_hyperparameters(stored) == parsed
    assert to_hyperparameters(parsed) == hps


def test_unsetting_a_default_cannot_be_expressed_and_says_so():
    cfg = replace_options(TrainConfig(), experiment_name=None)
    with pytest.raises(ValueError, match="experiment-name"):
        to_hyperparameters(cfg)


def test_metric_regexes_match_the_summary_the_training_job_prints(capsys):
    from twotower_lit.training.report import print_summary

    test = {"auc": 0.7831, "logloss": 0.5012, "accuracy": 0.7, "recall@20": 0.1234, "ndcg@20": 0.0567,
            "mrr@20": 0.0789, "hit_rate@20": 0.3456, "coverage@20": 0.2345, "popularity_rank@20": 123.4567}
    pop = {k: v / 2 for k, v in test.items()}
    print_summary({"test": test, "baselines": {"popularity": pop}}, "/out", 20)
    lines = capsys.readouterr().out.splitlines()
    import re

    found = {}
    definitions = metric_definitions(20)
    # (the per-epoch validation lines: tests/training/test_best_epoch.py)
    assert [m["Name"] for m in definitions if not m["Name"].startswith("test:")] == ["val:recall@20", "val:auc"]
    for m in definitions[:-2]:
        values = [float(x.group(1)) for line in lines if (x := re.search(m["Regex"], line))]
        assert len(values) == 1, (m, lines)
        found[m["Name"]] = values[0]
    assert found == {f"test:{k}": pytest.approx(v, abs=1e-4) for k, v in test.items()}
