"""The sectioned configs: option names independent of sections, an option name that differs from
its attribute, retired options, and the flat round trip every CLI and SageMaker job relies on."""
import argparse
import dataclasses

import pytest

from twotower_lit.config import TrainConfig
from twotower_lit.options import (OneLineHelpFormatter, Retired, add_arguments, from_dict, from_namespace, iter_fields,
                                  option_name, option_names, replace_options, to_flat_dict)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.train", formatter_class=OneLineHelpFormatter)
    add_arguments(parser, TrainConfig)
    return parser


def test_options_set_their_section_and_flat_names_stay_as_they_were():
    cfg = from_namespace(TrainConfig, _parser().parse_args(
        ["--batch-size", "64", "--loss", "bce", "--max-epochs", "3", "--sharding", "row_wise", "--tf32", "false",
         "--mlflow-uri", "none", "--resume", "auto", "--data-dir", "/d", "--seed", "7"]))
    assert (cfg.data.batch_size, cfg.loss.kind, cfg.optim.max_epochs, cfg.distributed.sharding) == \
        (64, "bce", 3, "row_wise")
    assert (cfg.performance.tf32, cfg.tracking.mlflow_uri, cfg.output.resume) == (False, "none", "auto")
    # a name at several depths is one option that sets all of them
    assert (cfg.data.data_dir, cfg.prepare.data_dir, cfg.seed, cfg.prepare.seed) == ("/d", "/d", 7, 7)
    flat = to_flat_dict(cfg)
    assert flat["loss"] == "bce" and "kind" not in flat and flat["batch_size"] == 64
    assert from_dict(TrainConfig, flat) == cfg
    # every option name is unique across the sections apart from prepare's shared ones
    names = [option_name(f) for path, f, _ in iter_fields(TrainConfig) if path[0] != "prepare"]
    assert len(names) == len(set(names))


def test_option_metadata_renames_a_field_everywhere():
    assert "loss" in option_names(TrainConfig) and "kind" not in option_names(TrainConfig)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--kind", "bce"])
    with pytest.raises(ValueError, match="unknown option.*kind"):
        from_dict(TrainConfig, {"kind": "bce"})
    changed = replace_options(TrainConfig(), loss="softmax", negatives=2)
    assert (changed.loss.kind, changed.data.negatives) == ("softmax", 2)
    assert TrainConfig().loss.kind == "both"  # a copy: the original is untouched
    with pytest.raises(ValueError, match="unknown option.*nope"):
        replace_options(TrainConfig(), nope=1)


def test_a_removed_option_is_accepted_at_its_old_default_with_a_notice_and_refused_otherwise(capsys):
    ns = _parser().parse_args(["--train-pipeline", "off", "--batch-size", "8"])
    assert vars(ns) == {"batch_size": 8}
    assert "--train-pipeline is gone and does nothing" in capsys.readouterr().err
    assert from_dict(TrainConfig, {"train_pipeline": "off"}) == TrainConfig()  # SageMaker hyperparameters
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--train-pipeline is gone and does nothing" in err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--train-pipeline", "sparse_dist"])
    assert "--train-pipeline sparse_dist: this option is gone" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--train-pipeline sparse_dist: this option is gone"):
        from_dict(TrainConfig, {"train_pipeline": "sparse_dist"})
    assert "--train-pipeline" not in _parser().format_help()  # retired options are not advertised


def test_a_renamed_option_passes_its_value_on(monkeypatch, capsys):
    monkeypatch.setattr(TrainConfig, "RETIRED",
                        (*TrainConfig.RETIRED, Retired("epochs", "the old name", renamed_to="max_epochs")))
    assert from_namespace(TrainConfig, _parser().parse_args(["--epochs", "5"])).optim.max_epochs == 5
    assert from_dict(TrainConfig, {"epochs": "4"}).optim.max_epochs == 4
    assert capsys.readouterr().err.count("--epochs is now --max-epochs") == 2


def test_each_option_carries_its_long_explanation_for_the_reference():
    actions = {a.dest: a for a in _parser()._actions}
    assert "log-Q correction" in actions["loss"].doc and len(actions["loss"].help) < 90
    assert actions["batch_size"].doc is None
    fields: dict = {}
    for _, f, _ in iter_fields(TrainConfig):
        fields.setdefault(option_name(f), f)  # the option shows the first field of its name
    for name, action in actions.items():
        if name in fields:
            assert len(fields[name].metadata["help"]) <= 90, name
            assert action.doc == fields[name].metadata.get("doc")


def test_sections_are_dataclasses_with_independent_defaults():
    a, b = TrainConfig(), TrainConfig()
    a.data.batch_size = 1
    assert b.data.batch_size == 1024
    assert all(dataclasses.is_dataclass(getattr(a, f.name)) for f in dataclasses.fields(TrainConfig)
               if f.name != "seed")
