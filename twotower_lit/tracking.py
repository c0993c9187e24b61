"""MLflow tracking: the tracking URI policy, run artifacts, the training-curve plot, the registered model."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping, Optional

from twotower_lit.evaluation import metric_key

DEFAULT_DB = "mlflow.db"


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


def plot_training_curves(client, run_id: str, path: str) -> str:
    """PNG of train loss per step and validation metrics per epoch from the run's history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    hist = client.get_metric_history(run_id, "train_loss")
    if hist:
        axes[0].plot([m.step for m in hist], [m.value for m in hist], lw=0.8)
    axes[0].set(title="training loss (mean per logging interval)", xlabel="step", ylabel="loss")
    for name in ("val_auc", "val_recall_at_10", "val_ndcg_at_10", "val_logloss"):
        h = client.get_metric_history(run_id, name)
        if h:
            axes[1].plot(range(1, len(h) + 1), [m.value for m in h], marker="o", label=name)
    axes[1].set(title="validation", xlabel="epoch")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_run_outputs(client, run_id: str, output_dir: str, model_dir: str, manifest: Mapping,
                    plan: Mapping, metrics: Mapping) -> None:
    """Final metrics, the data manifest, the sharding plan, the plot and the exported model."""
    for split in ("test",):
        for name, value in metrics.get(split, {}).items():
            client.log_metric(run_id, metric_key(f"final_{split}_{name}"), float(value))
    for name, value in metrics.get("baselines", {}).get("popularity", {}).items():
        client.log_metric(run_id, metric_key(f"baseline_popularity_{name}"), float(value))
    with tempfile.TemporaryDirectory() as tmp:
        for name, obj in (("data_manifest.json", manifest), ("sharding_plan.json", plan), ("metrics.json", metrics)):
            p = os.path.join(tmp, name)
            with open(p, "w") as f:
                json.dump(obj, f, indent=1, sort_keys=True)
            client.log_artifact(run_id, p)
    plot = plot_training_curves(client, run_id, os.path.join(output_dir, "training_curves.png"))
    client.log_artifact(run_id, plot)
    client.log_artifacts(run_id, model_dir, artifact_path="exported_model")


def register_model(uri: str, run_id: str, model_dir: str, name: str) -> Optional[str]:
    """Log the exported model as an MLflow pyfunc (TorchRec models cannot use mlflow.pytorch's
    default format) and register it under `name`; returns the registered version."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from twotower_lit.export.pyfunc import ExportedModelPyfunc

    mlflow.set_tracking_uri(uri)
    lib = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=ExportedModelPyfunc(), artifacts={"model_dir": model_dir},
            code_paths=[os.path.join(lib, "twotower_lit")],
            pip_requirements=["torch", "numpy", "safetensors"], registered_model_name=name or None,
            signature=infer_signature(pd.DataFrame({"user_id": [1]}), params={"k": 10}))
    return None if not name else str(info.registered_model_version)
