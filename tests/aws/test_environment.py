"""entrypoints/train.py inside a SageMaker training job: the environment reader, and a real
2-process torchrun run under a faithful imitation of a SageMaker container (/opt/ml in a temp dir)."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from twotower_lit.aws.container import stage_source_dir, training_requirements
from twotower_lit.aws.environment import (apply_sagemaker_environment, read_environment, training_arguments)
from twotower_lit.aws.hyperparameters import container_argv, to_hyperparameters
from twotower_lit.config import TrainConfig
from twotower_lit.options import replace_options

REPO = Path(__file__).resolve().parents[2]


def sm_env(root: Path, **extra) -> dict:
    env = {"SM_MODEL_DIR": str(root / "model"), "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
           "SM_HOSTS": json.dumps(["algo-1"]), "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": "0",
           "TRAINING_JOB_NAME": "tt-job-1", "SM_HPS": json.dumps({"max_epochs": 1})}
    env.update(extra)
    return env


def test_outside_sagemaker_nothing_changes():
    cfg = replace_options(TrainConfig(), max_epochs=2)
    assert read_environment({}) is None
    assert apply_sagemaker_environment(cfg, {"SM_CHANNEL_DATA": "/x"}) == cfg


def test_container_options_come_from_the_environment(tmp_path):
    env = sm_env(tmp_path, SM_CHANNEL_DATA=str(tmp_path / "input" / "data" / "data"),
                 SM_CHANNEL_CODE="/opt/ml/input/data/code", SM_CHANNEL_SM_DRIVERS="/opt/ml/input/data/sm_drivers",
                 WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    cfg = apply_sagemaker_environment(replace_options(TrainConfig(), max_epochs=1), env)
    assert cfg.data.data_dir == env["SM_CHANNEL_DATA"]
    assert cfg.output.output_dir == env["SM_OUTPUT_DATA_DIR"]
    assert cfg.output.checkpoint_dir == str(tmp_path / "checkpoints")
    assert (cfg.distributed.devices, cfg.distributed.num_nodes) == (2, 2)
    assert cfg.tracking.run_name == "tt-job-1" and cfg.output.progress is False and cfg.optim.max_epochs == 1


def test_v3_code_channels_are_not_data_and_one_other_channel_is(tmp_path):
    base = dict(SM_CHANNEL_CODE="/c", SM_CHANNEL_SM_DRIVERS="/d")
    assert apply_sagemaker_environment(TrainConfig(), sm_env(tmp_path, **base)).data.data_dir is None
    cfg = apply_sagemaker_environment(TrainConfig(), sm_env(tmp_path, SM_CHANNEL_TRAINING="/t", **base))
    assert cfg.data.data_dir == "/t"
    with pytest.raises(ValueError, match="name the prepared data channel 'data'"):
        apply_sagemaker_environment(TrainConfig(), sm_env(tmp_path, SM_CHANNEL_A="/a", SM_CHANNEL_B="/b"))


def test_explicit_options_win_and_gpus_without_torchrun(tmp_path):
    env = sm_env(tmp_path, SM_CHANNEL_DATA="/d", SM_NUM_GPUS="8",
                 SM_HPS=json.dumps({"progress": "true", "data_dir": "s3://b/p"}))
    cfg = apply_sagemaker_environment(replace_options(TrainConfig(), data_dir="s3://b/p", progress=True,
                                                      run_name="mine"), env)
    assert (cfg.data.data_dir, cfg.output.progress, cfg.tracking.run_name, cfg.distributed.devices,
            cfg.distributed.num_nodes) == ("s3://b/p", True, "mine", 8, 1)
    with pytest.raises(ValueError, match="torch_distributed"):
        apply_sagemaker_environment(TrainConfig(), sm_env(tmp_path, SM_HOSTS=json.dumps(["algo-1", "algo-2"])))


def test_snake_case_options_are_accepted():
    assert training_arguments(["--max_epochs", "2", "--user_layers=64,32", "x_y", "-h"]) == \
        ["--max-epochs", "2", "--user-layers=64,32", "x_y", "-h"]


def _prepare(raw: Path, out: Path) -> None:
    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.prepare import prepare_dataset

    prepare_dataset(PrepareConfig(data_dir=str(raw), min_shards=2), str(out), log=lambda *a, **k: None)


@pytest.mark.timeout(600)
def test_train_py_under_sagemaker_environment_with_torchrun(synthetic_movielens, tmp_path):
    """What a SageMaker PyTorch container does, on this machine: the staged source dir in
    /opt/ml/code, the data channel in /opt/ml/input/data/data, SM_* variables, hyperparameters as
    the SDK v2 toolkit passes them, `torchrun --nproc_per_node 2 entrypoints/train.py ...`."""
    ml = tmp_path / "opt" / "ml"
    code, data = ml / "code", ml / "input" / "data" / "data"
    for d in (ml / "model", ml / "output" / "data", data.parent):
        d.mkdir(parents=True)
    _prepare(synthetic_movielens("ml-1m", 3000, seed=3), data)
    stage_source_dir(str(code), training_requirements("ml.m5.xlarge", "2.13.0"))
    cfg = replace_options(TrainConfig(), max_epochs=1, batch_size=256, negatives=2, registered_model_name="",
                          accelerator="cpu", collective_timeout_s=120)
    hps = to_hyperparameters(cfg)
    env = dict(os.environ, **sm_env(ml, SM_CHANNEL_DATA=str(data), SM_HPS=json.dumps(hps)),
               PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--nnodes=1", "--nproc_per_node=2", "--standalone", "entrypoints/train.py",
           *container_argv(hps, "v2")]
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    out = ml / "output" / "data"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2 and 0.0 < metrics["test"]["auc"] <= 1.0
    assert (out / "mlflow.db").is_file()  # MLflow's embedded store goes to output.tar.gz
    assert list((ml / "checkpoints").glob("*/trainer_state.pt")), "checkpoints go where SageMaker syncs them"
    # /opt/ml/model is exactly what model.tar.gz must hold to be deployed as it is
    from twotower_lit.serving.package import package_model

    packaged = tmp_path / "expected.tar.gz"
    package_model(str(out / "model"), str(packaged))
    with tarfile.open(packaged) as tar:
        expected = {m.name for m in tar.getmembers() if m.isfile()}
    published = {str(p.relative_to(ml / "model")).replace(os.sep, "/")
                 for p in (ml / "model").rglob("*") if p.is_file()}
    assert published == expected
    assert {"manifest.json", "code/inference.py", "code/requirements.txt"} <= published

    from entrypoints import inference

    model = inference.model_fn(str(ml / "model"))
    users = json.loads((ml / "model" / "users.json").read_text())
    user = users[1] if isinstance(users, list) else int(next(iter(users)))
    answer = inference.predict_fn(inference.input_fn(json.dumps({"user_id": user, "k": 5}), "application/json"), model)
    assert len(answer["predictions"][0]["items"]) == 5
