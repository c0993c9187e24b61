"""MLflow tracking: the tracking URI policy, the experiment, run tags and inputs, run artifacts, the
training-curve plot, the logged and registered model."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from twotower_lit.evaluation import metric_key

DEFAULT_DB = "mlflow.db"
MANIFEST_SHA256_TAG = "data.manifest_sha256"
BEST_EPOCH_TAG, BEST_METRIC_TAG = "best_epoch", "best_metric"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own key: the UI shows it as the run's source version


def tracking_uri(uri: Optional[str], output_dir: str) -> Optional[str]:
    """The given URI, or an embedded SQLite database in the output directory (no server needed);
    None for 'none' (no tracking, e.g. on a machine without MLflow).

    MLflow's own default (a ./mlruns file store) refuses to work since 3.x without an opt-in, so
    a URI is always passed explicitly.
    """
    if uri and uri.lower() == "none":
        return None
    if uri:
        return uri
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, DEFAULT_DB))


def artifact_location(uri: str, output_dir: str) -> Optional[str]:
    """Artifacts of an embedded store live beside it; a server decides for itself."""
    if uri.startswith("sqlite:"):
        return "file://" + os.path.abspath(os.path.join(output_dir, "mlartifacts"))
    return None


def prepare_experiment(uri: str, output_dir: str, experiment_name: str) -> str:
    """The id of `experiment_name` in the store at `uri`, created if missing (Lightning's logger
    would otherwise create it with a warning-level line).

    A new SQLite database is created here with its artifact root in the output directory:
    MLflow's default root is ./mlruns of the working directory, where the "Default" experiment
    that every new database holds would point. That experiment stays empty, so it is deleted
    (MLflow keeps it as deleted, which its UI and clients expect of experiment 0)."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(uri, artifact_location(uri, output_dir))
        if experiment_name != "Default":
            store.delete_experiment(SqlAlchemyStore.DEFAULT_EXPERIMENT_ID)
        store.engine.dispose()
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment_name)
    if found is not None and found.lifecycle_stage != "deleted":
        return found.experiment_id
    return client.create_experiment(experiment_name, artifact_location=artifact_location(uri, output_dir))


def git_commit(path: str) -> Optional[str]:
    """The commit checked out where `path` lives, or None outside a git checkout (an installed
    package, a SageMaker job's code directory) or without git."""
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def manifest_sha256(data_dir: str) -> str:
    """SHA-256 of the prepared dataset's manifest.json as stored: it lists every shard's checksum,
    so it identifies the data the run trained on (`sha256sum manifest.json` gives the same)."""
    from twotower_lit.data.schema import MANIFEST
    from twotower_lit.data.storage import Storage

    return hashlib.sha256(Storage(data_dir).read_bytes(MANIFEST)).hexdigest()


def log_dataset(client, run_id: str, data_dir: str, manifest: Mapping, sha256: str) -> None:
    """The prepared dataset as the run's input (MLflow's dataset API: a metadata-only dataset
    named after it, its location as the source and the manifest's hash as the digest)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    location = data_dir if "://" in data_dir else "file://" + os.path.abspath(data_dir)
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice (schemes "" and "file"), the same class both times
        warnings.filterwarnings("ignore", message=r"The specified dataset source can be interpreted in multiple "
                                r"ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource\.")
        source = resolve_dataset_source(location)
    # (MLflow stores at most 36 characters of a digest; the whole hash is the run's tag)
    dataset = MetaDataset(source, name=str(manifest.get("dataset") or "movielens"), digest=sha256[:32])
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                     tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


History = Dict[str, List[Tuple[int, float]]]

# one panel per metric family: (title, y label, [(validation metric, label, baseline key)])
CURVE_PANELS = (
    ("validation log-loss", "log-loss", (("val_logloss", "log-loss", "logloss"),)),
    ("validation AUC", "AUC", (("val_auc", "AUC", "auc"),)),
    ("validation Recall@{k} / NDCG@{k}", "", (("val_recall_at_{k}", "Recall@{k}", "recall@{k}"),
                                              ("val_ndcg_at_{k}", "NDCG@{k}", "ndcg@{k}"))),
)


def training_curves_figure(history: History, steps_per_epoch: float, baseline: Optional[Mapping[str, float]],
                           k: int = 10):
    """The training curves: the training loss by epoch (one point per logging interval) and one
    panel per validation metric family by epoch, with the popularity baseline's test figure as a
    horizontal line of the same colour. `history` maps a metric to its (step, value) points in
    logging order; validation metrics have one point per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    loss = history.get("train_loss", [])
    if loss:
        # Lightning logs a step's metrics at its 0-based index: step s ends at (s + 1) / steps_per_epoch
        ax.plot([(s + 1) / steps_per_epoch for s, _ in loss], [v for _, v in loss], lw=0.9, label="training loss")
    ax.set(title="training loss (mean per logging interval)", xlabel="epoch", ylabel="loss")
    for ax, (title, ylabel, series) in zip(axes.flat[1:], CURVE_PANELS):
        for name, label, base_key in series:
            points = history.get(name.format(k=k), [])
            shown = label.format(k=k) if len(series) > 1 else "two-tower"
            line, = ax.plot(range(1, len(points) + 1), [v for _, v in points], marker="o", label=shown)
            if baseline and base_key.format(k=k) in baseline:
                ax.axhline(baseline[base_key.format(k=k)], color=line.get_color(), ls="--", lw=1,
                           label=f"{shown}, popularity baseline (test)" if len(series) > 1
                           else "popularity baseline (test)")
        ax.set(title=title.format(k=k), xlabel="epoch", ylabel=ylabel)
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def metric_history(client, run_id: str, names: Sequence[str]) -> History:
    return {name: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, name),
                                                     key=lambda m: (m.step, m.timestamp))]
            for name in names}


def plot_training_curves(client, run_id: str, path: str, metrics: Mapping, k: int = 10) -> str:
    """PNG of the run's training curves (`training_curves_figure`) from its MLflow history."""
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.flush_async_logging()  # the logger queues metrics: the history is complete only after this
    names = ["train_loss"] + [name.format(k=k) for _, _, series in CURVE_PANELS for name, _, _ in series]
    train = metrics.get("train", {})
    steps_per_epoch = max(train.get("steps", 1), 1) / max(train.get("epochs", 1), 1)
    fig = training_curves_figure(metric_history(client, run_id, names), steps_per_epoch,
                                 metrics.get("baselines", {}).get("popularity"), k)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_run_outputs(client, run_id: str, output_dir: str, model_dir: str, data_dir: str, manifest: Mapping,
                    plan: Mapping, metrics: Mapping, k: int = 10, log_export: bool = True) -> None:
    """Run tags (git commit, data manifest hash), the dataset input, the baseline's metrics, the
    data manifest, the sharding plan, the plot, and the exported model's files unless
    `log_export` is False (the registered pyfunc model carries them: `register_model`).
    The test metrics are on the run already: the test loop logs them."""
    sha = manifest_sha256(data_dir)
    client.set_tag(run_id, MANIFEST_SHA256_TAG, sha)
    commit = git_commit(os.path.dirname(os.path.abspath(__file__)))
    if commit:
        client.set_tag(run_id, GIT_COMMIT_TAG, commit)
    log_dataset(client, run_id, data_dir, manifest, sha)
    train = metrics.get("train", {})
    if train.get("best_epoch") is not None:
        # the epoch the test metrics and the export are of (metrics.json's train.best_epoch)
        client.set_tag(run_id, BEST_EPOCH_TAG, str(train["best_epoch"]))
        client.set_tag(run_id, BEST_METRIC_TAG, str(train["best_metric"]))
    for name, value in metrics.get("baselines", {}).get("popularity", {}).items():
        client.log_metric(run_id, metric_key(f"baseline_popularity_{name}"), float(value))
    with tempfile.TemporaryDirectory() as tmp:
        for name, obj in (("data_manifest.json", manifest), ("sharding_plan.json", plan), ("metrics.json", metrics)):
            p = os.path.join(tmp, name)
            with open(p, "w") as f:
                json.dump(obj, f, indent=1, sort_keys=True)
            client.log_artifact(run_id, p)
    plot = plot_training_curves(client, run_id, os.path.join(output_dir, "training_curves.png"), metrics, k)
    client.log_artifact(run_id, plot)
    if log_export:
        client.log_artifacts(run_id, model_dir, artifact_path="exported_model")


@contextlib.contextmanager
def _environment(**values: str):
    """Environment variables set for the duration of a block (MLflow reads some only from there)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


PYFUNC_MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export", "pyfunc_model.py")


def register_model(uri: str, run_id: str, model_dir: str, name: str) -> Optional[str]:
    """Log the exported model as an MLflow pyfunc (TorchRec models cannot use mlflow.pytorch's
    default format) and register it under `name`; returns the registered version.

    The pyfunc is logged from code (`export/pyfunc_model.py`), not pickled: loading it runs our
    code and reads the export's safetensors, nothing is unpickled."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    mlflow.set_tracking_uri(uri)
    lib = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(model_dir, "users.json")) as f:
        example_user = int(json.load(f)[1])
    signature = ModelSignature(inputs=Schema([ColSpec("long", "user_id")]),
                               params=ParamSchema([ParamSpec("k", "long", 10)]))
    with mlflow.start_run(run_id=run_id), _environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        # (checking the input example loads the logged model: without a bar per file it copies)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=PYFUNC_MODEL_FILE, artifacts={"model_dir": model_dir},
            code_paths=[os.path.join(lib, "twotower_lit")], pip_requirements=["torch", "numpy", "safetensors"],
            registered_model_name=name or None, signature=signature,
            input_example=pd.DataFrame({"user_id": [example_user]}))
    return None if not name else str(info.registered_model_version)
