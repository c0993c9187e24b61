"""Training logs to a real `mlflow server` on 127.0.0.1 (started by the test)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import free_port
from tests.training.conftest import TRAIN_ARGS, read_json, run_cli
from tests.training.test_training import WARNING_LINE


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {proc.stderr.read().decode(errors='replace')[-3000:]}")
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("mlflow server did not answer /health within 90 s")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_training_logs_to_mlflow_server(mlflow_server, prepared_synthetic, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    proc = run_cli("entrypoints.train", ["--data-dir", str(prepared_synthetic), "--output-dir", str(out),
                                         "--mlflow-uri", mlflow_server, "--experiment-name", "server-test",
                                         "--registered-model-name", "twotower-server-test", "--run-name", "srv",
                                         *TRAIN_ARGS])
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if WARNING_LINE.search(line)] == []
    assert not (out / "mlflow.db").exists()  # nothing embedded when a server is given
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "srv" and run.info.status == "FINISHED"
    assert f"MLflow run {run.info.run_id} on {mlflow_server}" in lines
    assert run.data.params["batch_size"] == "512"
    metrics = read_json(out / "metrics.json")
    assert run.data.metrics["test_recall_at_10"] == pytest.approx(metrics["test"]["recall@10"], abs=1e-6)
    assert len(client.get_metric_history(run.info.run_id, "test_recall_at_10")) == 1
    assert not [name for name in run.data.metrics if name.startswith("final_")]
    assert len(run.data.tags["data.manifest_sha256"]) == 64
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == run.data.tags["data.manifest_sha256"][:32]
    assert run.data.metrics["baseline_popularity_auc"] == pytest.approx(metrics["baselines"]["popularity"]["auc"])
    assert len(client.get_metric_history(run.info.run_id, "val_recall_at_10")) == 2
    # logged asynchronously: every interval's training loss is on the server once the run is finished
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == metrics["train"]["steps"] // 10
    # the exported model once: in the registered pyfunc, not also among the run's artifacts
    assert "exported_model" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    (logged,) = client.search_logged_models([exp.experiment_id])
    names = {a.path for a in client.list_logged_model_artifacts(logged.model_id, "artifacts/model")}
    assert {"artifacts/model/model.safetensors", "artifacts/model/manifest.json"} <= names
    (version,) = client.search_model_versions("name='twotower-server-test'")
    assert version.run_id == run.info.run_id
    # the registered pyfunc loads and recommends for a known user
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/twotower-server-test/{version.version}")
    users = read_json(out / "model" / "users.json")
    pred = model.predict(pd.DataFrame({"user_id": [users[1]]}), params={"k": 5})
    assert len(pred.iloc[0]["items"]) == 5
