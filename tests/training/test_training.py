"""End-to-end training through the real CLI: metrics, baselines, export, evaluate, MLflow."""
from __future__ import annotations

import os
import re
import tarfile
import time

import lightning as L
import numpy as np
import pytest
import torch

from tests.training.conftest import TRAIN_ARGS, read_json, run_cli

KEYS = ("auc", "logloss", "accuracy", "recall@10", "ndcg@10", "mrr@10", "hit_rate@10", "coverage@10",
        "popularity_rank@10")


@pytest.fixture(scope="module")
def trained_run(prepared_synthetic, tmp_path_factory):
    """The real training command's output directory and its completed process (what it printed)."""
    out = tmp_path_factory.mktemp("run") / "out"
    start = time.time()
    proc = run_cli("entrypoints.train", ["--data-dir", str(prepared_synthetic), "--output-dir", str(out),
                                         "--package", "true", *TRAIN_ARGS])
    proc.wall_seconds = time.time() - start  # (the process's whole life, as seen from outside)
    return out, proc


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run[0]


# what a warning looks like in a job's log: Python's warnings, logging's WARNING records (MLflow's
# "2026/01/01 ... WARNING ...", torch's "[rank0]:W1207 ..."), deprecations and library tips
WARNING_LINE = re.compile(r"warn|deprecat|tip:|^\[rank\d+\]:W\d|not found\. creating it", re.IGNORECASE)


def metrics_of(out):
    return read_json(out / "metrics.json")


def test_training_prints_no_warnings_and_points_to_its_outputs(trained_run):
    out, proc = trained_run
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if WARNING_LINE.search(line)] == []
    # one validation line per epoch, then the exported epoch's again, and which epoch that is
    train = metrics_of(out)["train"]
    val = [line for line in proc.stdout.splitlines() if line.startswith("val:")]
    best = train["val_history"][train["best_epoch"] - 1]
    assert val == [f"val:recall@10={h['val_recall_at_10']:.4f} val:auc={h['val_auc']:.4f} epoch={h['epoch']}"
                   for h in (*train["val_history"], best)]
    assert any(line.startswith(f"tested and exported: epoch {train['best_epoch']} of 2, the best by val_recall_at_10")
               for line in lines)
    assert f"training curves: {out / 'training_curves.png'}" in lines
    assert any(line.startswith("run plan: 1 process(es) on cpu; 1 step(s) per call; CUDA graphs off") for line in lines)
    ui = [line for line in lines if "mlflow ui" in line]
    assert len(ui) == 1 and ui[0].endswith(f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} "
                                           f"--default-artifact-root file://{out / 'mlartifacts'}")


def test_the_job_says_where_its_time_went(trained_run):
    """metrics.json's train.phases: every phase of the job, in order, adding up to its wall time
    but for the interpreter's exit; the training loop is the loop clock's; the summary shows them."""
    out, proc = trained_run
    train = metrics_of(out)["train"]
    phases = train["phases"]
    order = [
        "start-up and imports", "data preparation and plan", "data loading", "model, logger and trainer",
        "fit start-up (process group, sharding, sanity check)", "training loop", "validation",
        "checkpoints and epoch ends", "best epoch restored", "test metrics and full-ranking evaluation",
        "weights gathered", "popularity baseline and metrics", "export", "tracking"]
    assert sorted(phases) == sorted(order)  # (metrics.json sorts its keys; the summary keeps the order)
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["training loop"] == pytest.approx(train["loop_seconds"], abs=0.01)
    assert phases["start-up and imports"] > 0.5 and phases["validation"] > 0 and phases["tracking"] > 0
    total = sum(phases.values())
    assert 0.75 * proc.wall_seconds <= total <= proc.wall_seconds, (total, proc.wall_seconds)
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("time: "))
    assert summary == f"time: {total:.1f} s: " + ", ".join(f"{name} {phases[name]:.1f}" for name in order)


def test_metrics_json_has_model_and_popularity_figures(trained):
    metrics = read_json(trained / "metrics.json")
    for block in (metrics["test"], metrics["baselines"]["popularity"]):
        for key in KEYS:
            assert key in block and np.isfinite(block[key]), key
        for key in ("recall@10", "ndcg@10", "mrr@10", "hit_rate@10", "coverage@10"):
            assert 0.0 <= block[key] <= 1.0, key
        assert block["mrr@10"] <= block["hit_rate@10"] and block["recall@10"] <= block["hit_rate@10"]
        assert block["popularity_rank@10"] >= 1.0
    # the synthetic ratings depend on latent user/item factors: a personalised model must win
    assert metrics["test"]["auc"] > metrics["baselines"]["popularity"]["auc"]
    assert metrics["test"]["recall@10"] > 0.0
    # popularity recommends the same few most rated items to everyone; a personalised model does not
    pop = metrics["baselines"]["popularity"]
    assert metrics["test"]["coverage@10"] > pop["coverage@10"]
    assert metrics["test"]["popularity_rank@10"] > pop["popularity_rank@10"]
    train = metrics["train"]
    # the epoch tested and exported: the best validation Recall@10 within the AUC guard (of 2 here)
    history = train["val_history"]
    assert [h["epoch"] for h in history] == [1, 2] and not train["stopped_early"]
    assert train["best_metric"] == "val_recall_at_10" and train["best_epoch"] in (1, 2)
    assert train["best_value"] == history[train["best_epoch"] - 1]["val_recall_at_10"]
    # rows per second of the training loop, overall and per epoch
    assert len(train["epoch_samples_per_s"]) == train["epochs"] == 2
    assert min(train["epoch_samples_per_s"]) <= train["samples_per_s"] <= max(train["epoch_samples_per_s"])
    # the run plan: every 'auto' resolved once, recorded as it was followed
    plan = metrics["plan"]
    assert plan["device_type"] == "cpu" and plan["world_size"] == 1 and plan["data_on_device"] is False
    assert plan["steps_per_execution"] == 1 and plan["cuda_graphs"] is False and plan["resume_from"] is None
    tables = dict(kind.split(":") for kind in plan["table_kinds"].split(","))
    assert tables.keys() == {t[len("t_"):] for t in metrics["sharding_plan"]} and set(tables.values()) == {"table_wise"}


def test_evaluate_from_export_matches_training_metrics(trained, prepared_synthetic):
    """The exported artifact alone reproduces the sharded model's test metrics: same scores."""
    proc = run_cli("entrypoints.evaluate", ["--model-dir", str(trained / "model"), "--data-dir",
                                            str(prepared_synthetic), "--split", "test"])
    import json

    evaluated = json.loads(proc.stdout)["test"]
    trained_metrics = read_json(trained / "metrics.json")["test"]
    for key in KEYS:
        assert evaluated[key] == pytest.approx(trained_metrics[key], abs=2e-4), key


def test_export_is_complete_and_loads_without_torchrec(trained):
    import subprocess
    import sys

    code = ("import sys, json; from twotower_lit.export.format import load_export; "
            f"m = load_export({str(trained / 'model')!r}); "
            "print(json.dumps([m.num_items, 'torchrec' in sys.modules, 'lightning' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    import json

    num_items, torchrec_loaded, lightning_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert num_items > 0 and not torchrec_loaded and not lightning_loaded


def test_corrupted_export_is_refused(trained, tmp_path):
    import shutil

    from twotower_lit.export.format import ArtifactError, load_export

    copy = tmp_path / "model"
    shutil.copytree(trained / "model", copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="sha256"):
        load_export(str(copy))


def test_package_has_sagemaker_layout(trained):
    with tarfile.open(trained / "model.tar.gz") as tar:
        names = set(tar.getnames())
    for name in ("model.safetensors", "config.json", "manifest.json", "code/inference.py",
                 "code/requirements.txt", "code/twotower_lit/export/format.py", "code/twotower_lit/config.py",
                 "code/twotower_lit/serving/handler.py"):
        assert name in names, name
    assert not any(n.startswith("code/twotower_lit/") and "torchrec" in n for n in names)


def test_embedded_sqlite_mlflow_run_has_everything(trained):
    import hashlib
    import subprocess

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    db = trained / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    # one experiment: the "Default" one every new database holds is deleted, and points into the run
    (exp,) = client.search_experiments()
    assert exp.name == "twotower-movielens" and exp.artifact_location == f"file://{trained / 'mlartifacts'}"
    default = client.get_experiment("0")
    assert default.lifecycle_stage == "deleted" and default.artifact_location.startswith(f"file://{trained}/")
    assert len(client.search_experiments(view_type=ViewType.ALL)) == 2
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["negatives"] == "2" and run.data.params["max_epochs"] == "2"
    assert run.data.params["plan.steps_per_execution"] == "1" and run.data.params["plan.cuda_graphs"] == "False"
    assert len(client.get_metric_history(run.info.run_id, "val_auc")) == 2  # one per epoch
    recall = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_recall_at_10"),
                                      key=lambda m: m.step)]
    assert recall == pytest.approx([h["val_recall_at_10"] for h in metrics_of(trained)["train"]["val_history"]])
    assert run.data.tags["best_epoch"] == str(metrics_of(trained)["train"]["best_epoch"])
    assert run.data.tags["best_metric"] == "val_recall_at_10"
    # the training loss: one point (the interval mean) per logging interval of 10 steps
    metrics = read_json(trained / "metrics.json")
    steps = metrics["train"]["steps"]
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) == steps // 10 and steps >= 20
    assert all(np.isfinite(m.value) and m.value > 0 for m in losses)
    # each test metric once, as the test loop logged it
    for key, name in (("auc", "test_auc"), ("recall@10", "test_recall_at_10"), ("ndcg@10", "test_ndcg_at_10"),
                      ("mrr@10", "test_mrr_at_10"), ("coverage@10", "test_coverage_at_10"),
                      ("popularity_rank@10", "test_popularity_rank_at_10")):
        assert len(client.get_metric_history(run.info.run_id, name)) == 1
        assert run.data.metrics[name] == pytest.approx(metrics["test"][key], abs=1e-6), name
    assert run.data.metrics["baseline_popularity_hit_rate_at_10"] == pytest.approx(
        metrics["baselines"]["popularity"]["hit_rate@10"], abs=1e-6)
    assert not [name for name in run.data.metrics if name.startswith("final_")]
    # the code and the data it trained on
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    data_dir = metrics["data"]["dir"]
    sha = hashlib.sha256(open(os.path.join(data_dir, "manifest.json"), "rb").read()).hexdigest()
    assert run.data.tags["data.manifest_sha256"] == sha
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == sha[:32] and dataset.dataset.name == "ml-1m"
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "training")]
    assert data_dir in dataset.dataset.source
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"data_manifest.json", "sharding_plan.json", "metrics.json", "training_curves.png"}
    # the model once: the registered pyfunc, which carries the export's files
    (logged,) = client.search_logged_models([exp.experiment_id])
    assert logged.source_run_id == run.info.run_id
    stored = logged.artifact_location.removeprefix("file://")
    assert sorted(os.listdir(os.path.join(stored, "artifacts", "model"))) == sorted(os.listdir(trained / "model"))
    versions = client.search_model_versions("name='twotower-movielens'")
    assert [v.run_id for v in versions] == [run.info.run_id]


def test_training_curves_have_a_panel_per_metric_family_by_whole_epochs(trained):
    """The plot of the run's own MLflow history: the loss, log-loss, AUC and ranking panels, epochs
    as whole numbers, the popularity baseline as a horizontal line of each validation metric."""
    from mlflow.tracking import MlflowClient

    from twotower_lit.tracking import metric_history, training_curves_figure

    client = MlflowClient(tracking_uri=f"sqlite:///{trained / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("twotower-movielens").experiment_id])
    metrics = read_json(trained / "metrics.json")
    names = ("train_loss", "val_logloss", "val_auc", "val_recall_at_10", "val_ndcg_at_10")
    history = metric_history(client, run.info.run_id, names)
    baseline = metrics["baselines"]["popularity"]
    fig = training_curves_figure(history, metrics["train"]["steps"] / metrics["train"]["epochs"], baseline)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["training loss (mean per logging interval)", "validation log-loss",
                                              "validation AUC", "validation Recall@10 / NDCG@10"]
    for ax in axes:
        assert ax.get_xlabel() == "epoch"
        ticks = ax.get_xticks()
        assert len(ticks) and all(float(t).is_integer() for t in ticks), ax.get_title()
    (loss,) = axes[0].lines
    assert len(loss.get_xdata()) == len(history["train_loss"]) and loss.get_xdata()[-1] == pytest.approx(2.0, abs=0.2)
    for ax, keys in zip(axes[1:], (("logloss",), ("auc",), ("recall@10", "ndcg@10"))):
        curves = [line for line in ax.lines if line.get_linestyle() == "-"]
        assert [list(line.get_xdata()) for line in curves] == [[1, 2]] * len(keys)
        flat = [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"]
        assert flat == pytest.approx([baseline[key] for key in keys]), ax.get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_same_seed_same_result(trained, prepared_synthetic, tmp_path):
    again = tmp_path / "again"
    # (also: with tracking off, nothing MLflow is written and the job still completes)
    run_cli("entrypoints.train", ["--data-dir", str(prepared_synthetic), "--output-dir", str(again),
                                  "--mlflow-uri", "none", *TRAIN_ARGS])
    first, second = read_json(trained / "metrics.json")["test"], read_json(again / "metrics.json")["test"]
    assert first == second
    assert not (again / "mlflow.db").exists() and "mlflow" not in read_json(again / "metrics.json")


def test_exported_scores_equal_model_scores(prepared_synthetic, tmp_path):
    """Direct check on an unsharded model with random weights: export == forward pass."""
    from twotower_lit.config import ModelConfig
    from twotower_lit.data.datamodule import MovieLensDataModule
    from twotower_lit.export.format import load_export
    from twotower_lit.export.writer import export_model
    from twotower_lit.layers import logits
    from twotower_lit.model import TwoTower, feature_specs

    dm = MovieLensDataModule(str(prepared_synthetic))
    dm.load()
    cfg = ModelConfig(embedding_dim=8, user_layers=[16, 4], item_layers=[12, 4], exposure_dims=1)
    features = feature_specs(dm.manifest)
    torch.manual_seed(0)
    model = TwoTower(features, cfg.embedding_dim, cfg.user_layers, cfg.item_layers, exposure_dims=1)
    for table in model.ebc.embedding_bags.values():
        torch.nn.init.normal_(table.weight, std=0.3)
    export_model(str(tmp_path / "m"), model.state_dict(), features, cfg, dm, metrics={})
    exported = load_export(str(tmp_path / "m"))
    rng = np.random.default_rng(0)
    users = rng.integers(1, dm.num_users, 64)
    items = rng.integers(1, dm.num_items, 64)
    with torch.no_grad():
        u, i = model(dm.builder.build(users, items))
        expected = (u * i).sum(1)
        eu = exported.user_vectors(exported.user_features[torch.from_numpy(users)])
        ei = exported.item_vectors[torch.from_numpy(items - 1)]
        got = (eu * ei).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the liking logit (BCE, AUC) leaves out the last exposure dimension, in the export as in training
    assert exported.exposure_dims == 1
    liking = logits(eu, ei, exported.exposure_dims)
    torch.testing.assert_close(liking, (u[:, :3] * i[:, :3]).sum(1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(liking, expected)
    # no activation on the last tower layer: scores can be negative (over every user-item pair)
    with torch.no_grad():
        every = exported.user_vectors(exported.user_features[1:]) @ exported.item_vectors.T
    assert (every < 0).any()


def _plan(cfg, tmp_path):
    """The run plan of `cfg` for a small two-table model writing under `tmp_path`."""
    from twotower_lit.training.plan import resolve_plan

    return resolve_plan(cfg, "run", str(tmp_path), str(tmp_path / "checkpoints"), {"user": 10, "item": 10}, 100,
                        True, None, None)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_redraws_once_per_logging_interval(tmp_path, progress):
    from twotower_lit.config import TrainConfig
    from twotower_lit.options import replace_options
    from twotower_lit.training.job import LOG_EVERY_N_STEPS, build_trainer

    cfg = replace_options(TrainConfig(), accelerator="cpu", devices=1, progress=progress)
    trainer = build_trainer(cfg, _plan(cfg, tmp_path), logger=False)
    assert trainer.log_every_n_steps == LOG_EVERY_N_STEPS > 1
    bar = trainer.progress_bar_callback
    if progress:
        assert isinstance(bar, L.pytorch.callbacks.TQDMProgressBar) and bar.refresh_rate == LOG_EVERY_N_STEPS
    else:
        assert bar is None


def test_several_steps_per_call_train_the_same_run(trained, prepared_synthetic, tmp_path):
    """--steps-per-execution 3: the same steps on the same batches as one step per call (the same
    test metrics, exactly), the logged training loss once per 12 steps (the smallest multiple of 3
    from the usual 10), on the same step axis."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "k3"
    run_cli("entrypoints.train", ["--data-dir", str(prepared_synthetic), "--output-dir", str(out),
                                  "--steps-per-execution", "3", *TRAIN_ARGS])
    one, three = read_json(trained / "metrics.json"), read_json(out / "metrics.json")
    assert three["train"]["steps"] == one["train"]["steps"]
    assert one["train"]["steps"] % 3  # an epoch that is not a multiple of 3 steps: a short last call
    assert three["test"] == one["test"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("twotower-movielens").experiment_id])[0]
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    # Lightning logs a step's metrics at its 0-based index: steps 12, 24, ... are 11, 23, ...
    assert sorted(m.step for m in losses) == list(range(11, three["train"]["steps"], 12))


def test_steps_per_execution_by_device_log_and_redraw_intervals_and_what_is_refused(tmp_path):
    from twotower_lit.config import TrainConfig
    from twotower_lit.options import replace_options
    from twotower_lit.patches import lean_steps_allowed
    from twotower_lit.training.job import build_trainer
    from twotower_lit.training.plan import GPU_STEPS_PER_EXECUTION, resolve_steps_per_execution

    cfg = replace_options(TrainConfig(), accelerator="cpu", devices=1, steps_per_execution=4)
    trainer = build_trainer(cfg, _plan(cfg, tmp_path), logger=False)
    assert trainer.log_every_n_steps == 12  # a multiple of 4: logged steps fall on call boundaries
    assert trainer.progress_bar_callback.refresh_rate == 1  # one redraw per call of 4 steps
    # none of the job's callbacks listens to the per-step hooks: the steps after each call's first are lean
    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.model import FeatureSpec
    from twotower_lit.training.module import TwoTowerModule

    module = TwoTowerModule([FeatureSpec("user", 10, "user"), FeatureSpec("item", 10, "item")],
                            ModelConfig(embedding_dim=4, user_layers=[4], item_layers=[4], exposure_dims=0),
                            OptimConfig())
    module.trainer = trainer
    assert cfg.output.progress and lean_steps_allowed(trainer, module)
    # 0 (the default): several steps per call where the host's per-step work bounds a step
    assert TrainConfig().performance.steps_per_execution == 0
    assert resolve_steps_per_execution(TrainConfig(), "cuda") == GPU_STEPS_PER_EXECUTION > 1
    assert resolve_steps_per_execution(TrainConfig(), "cpu") == 1
    assert resolve_steps_per_execution(replace_options(TrainConfig(), steps_per_execution=3), "cpu") == 3
    with pytest.raises(ValueError, match=r"at least 1 \(or 0: by device\), got -1"):
        resolve_steps_per_execution(replace_options(TrainConfig(), steps_per_execution=-1), "cpu")


def test_data_on_device_auto_takes_gpus_that_hold_the_split_and_runs_without_negatives():
    from twotower_lit.config import TrainConfig
    from twotower_lit.options import replace_options
    from twotower_lit.training.plan import DEVICE_BYTES_PER_ROW, resolve_data_on_device

    cfg = TrainConfig()
    gib = 2**30
    assert cfg.performance.data_on_device == "auto"
    # ML-32M's training split (25.6 M rows) on a 16 GiB GPU; rows for a quarter of its memory fit, for all of it not
    assert resolve_data_on_device(cfg, "cuda", 25_600_000, device_memory=16 * gib)
    assert not resolve_data_on_device(cfg, "cuda", 16 * gib // DEVICE_BYTES_PER_ROW, device_memory=16 * gib)
    assert resolve_data_on_device(cfg, "cuda", 4 * gib // DEVICE_BYTES_PER_ROW, device_memory=16 * gib)
    assert not resolve_data_on_device(cfg, "cpu", 1000, device_memory=16 * gib)
    assert not resolve_data_on_device(replace_options(cfg, negatives=2), "cuda", 1000, device_memory=16 * gib)
    # explicit choices win; a boolean from a SageMaker hyperparameter is read as one
    assert resolve_data_on_device(replace_options(cfg, data_on_device="true"), "cpu", 10**12, device_memory=1)
    assert not resolve_data_on_device(replace_options(cfg, data_on_device="false"), "cuda", 1, device_memory=16 * gib)
    assert resolve_data_on_device(replace_options(cfg, data_on_device=True), "cpu", 1)
    with pytest.raises(ValueError, match="--data-on-device 'maybe': choose auto, true or false"):
        resolve_data_on_device(replace_options(cfg, data_on_device="maybe"), "cuda", 1, device_memory=16 * gib)


def test_a_call_of_several_steps_ends_at_the_next_multiple_of_k_or_of_the_checkpoint_interval():
    from twotower_lit.training.steps import EagerSteps

    module = EagerSteps(steps_per_execution=16, checkpoint_every_n_steps=100)
    ends, step = [], 0
    while step < 140:
        step += module.steps_this_call(step)
        ends.append(step)
    assert ends == [16, 32, 48, 64, 80, 96, 100, 112, 128, 144]
    assert module.steps_this_call(5) == 11  # resumed (or after an epoch's short last call) mid-way: back in step
