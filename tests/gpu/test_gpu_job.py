"""The training job on the GPU end to end, through its command line: the default job on a small
synthetic set, a mid-epoch checkpoint written there resumed, and its export scored on a CPU-only
process. MLflow is off (``--mlflow-uri none``): the GPU machine has no tracking packages."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training.conftest import REPO, read_json

pytestmark = pytest.mark.gpu

KEYS = ("auc", "logloss", "accuracy", "recall@10", "ndcg@10")
EVERY = 5  # steps between step checkpoints
# the job's defaults run the towers' matmuls in TF32 on GPUs: metrics of the same weights computed
# elsewhere (a CPU in float32) agree to this, or by one reordered near-tie per few hundred users
TF32_ABS = 2e-3
# a resumed run's weights against the uninterrupted run's: the same steps, the last ones eager
# instead of replayed (the same kernels); a batch trained once more or less moves them by about a
# learning rate (Adam's 1e-3 for the towers, 0.05 for the tables)
RESUME_ABS = 1e-4


def _env(**extra: str):
    """This environment, the repository first on PYTHONPATH and what was there kept (on the GPU
    machine TorchRec and FBGEMM are found through PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def _job(data: Path, out: Path, device, *extra: str, check: bool = True):
    args = ["--data-dir", str(data), "--output-dir", str(out), "--accelerator", "gpu" if device.type == "cuda"
            else "cpu", "--devices", "1", "--max-epochs", "2", "--batch-size", "1024", "--mlflow-uri", "none",
            "--progress", "false", *extra]
    proc = subprocess.run([sys.executable, "-m", "entrypoints.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"entrypoints.train {' '.join(args)} exited {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def _step(checkpoint: Path) -> int:
    return int(re.search(r"step(\d+)", checkpoint.name).group(1))


def _weights(run: Path):
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(gpu_prepared, device, tmp_path_factory) -> Path:
    """The default job (two epochs) on the GPU, with a checkpoint every EVERY steps."""
    out = tmp_path_factory.mktemp("gpu-job") / "out"
    _job(gpu_prepared, out, device, "--checkpoint-every-n-steps", str(EVERY))
    return out


def _steps_per_epoch(run: Path) -> int:
    return read_json(run / "metrics.json")["train"]["steps"] // 2


def _mid_epoch(run: Path, epoch: int):
    """The latest step checkpoint written within `epoch` (not at its end)."""
    per = _steps_per_epoch(run)
    found = [p for p in (run / "checkpoints").glob(f"epoch{epoch}-step*") if _step(p) % per]
    assert found, f"no mid-epoch checkpoint of epoch {epoch} in {sorted(os.listdir(run / 'checkpoints'))}"
    return max(found, key=_step)


def test_default_job_on_the_gpu_beats_popularity_and_writes_complete_metrics(reference, device):
    """`--accelerator gpu` with the job's defaults: batches built on the GPU (--data-on-device
    auto), steps replayed as a CUDA graph (--cuda-graphs auto), and a metrics.json with every
    figure of the model and of the popularity baseline; the model separates liked from disliked
    ratings better than popularity (test AUC)."""
    metrics = read_json(reference / "metrics.json")
    for block in (metrics["test"], metrics["baselines"]["popularity"]):
        for key in KEYS:
            assert key in block and np.isfinite(block[key]), key
        assert 0.0 <= block["recall@10"] <= 1.0 and 0.0 <= block["ndcg@10"] <= 1.0
    train = metrics["train"]
    assert train["world_size"] == 1 and train["epochs"] == 2 and len(train["epoch_samples_per_s"]) == 2
    assert train["steps"] == 2 * _steps_per_epoch(reference) > 2 * EVERY
    assert all(rate > 0 for rate in train["epoch_samples_per_s"])
    if device.type == "cuda":
        assert train["data_on_device"] is True
        graphs = train["cuda_graphs"]
        assert graphs["captured"] is True and graphs["replays"] > train["steps"] // 2, graphs
        assert graphs["replays"] + graphs["eager_steps"] + graphs["other_shapes"] == train["steps"], graphs
    assert metrics["test"]["auc"] > metrics["baselines"]["popularity"]["auc"]
    assert (reference / "model" / "model.safetensors").is_file()


def test_a_mid_epoch_checkpoint_of_the_gpu_resumes_exactly(reference, gpu_prepared, device, tmp_path):
    """Resumed from a step checkpoint within the second epoch (batches built on the GPU, steps
    graphed: the resumed process warms up and captures anew), the run ends with the reference's
    steps, weights (within RESUME_ABS: the reference's steps at that point were replays, the
    resumed run's first ones eager) and test metrics (within TF32_ABS)."""
    mid = _mid_epoch(reference, 1)
    out = tmp_path / "resumed"
    _job(gpu_prepared, out, device, "--resume", str(mid))
    want, got = read_json(reference / "metrics.json"), read_json(out / "metrics.json")
    assert got["train"]["steps"] == want["train"]["steps"]
    assert got["train"]["data_on_device"] is want["train"]["data_on_device"]
    a, b = _weights(reference), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=0, atol=RESUME_ABS, err_msg=key)
    for key in KEYS:
        assert got["test"][key] == pytest.approx(want["test"][key], abs=TF32_ABS), key


def test_gpu_checkpoints_resume_across_data_on_device_where_allowed(reference, gpu_prepared, device, tmp_path):
    """The other training reader (the streaming loader, --data-on-device false) resumes the GPU
    run's end-of-epoch checkpoint and trains the remaining epoch; a mid-epoch checkpoint, whose
    epoch it would continue in another row order, is refused before training, naming the option."""
    want = read_json(reference / "metrics.json")
    on = "true" if want["train"]["data_on_device"] else "false"
    other = "false" if on == "true" else "true"
    first = next((reference / "checkpoints").glob("epoch0-end-*"))
    out = tmp_path / "other-reader"
    _job(gpu_prepared, out, device, "--data-on-device", other, "--resume", str(first))
    got = read_json(out / "metrics.json")
    assert got["train"]["steps"] == want["train"]["steps"]
    assert got["train"]["data_on_device"] is (other == "true")
    assert len(got["train"]["epoch_samples_per_s"]) == 1  # one epoch trained in this process
    assert got["test"]["auc"] > got["baselines"]["popularity"]["auc"]

    mid = _mid_epoch(reference, 1)
    refused = tmp_path / "refused"
    proc = _job(gpu_prepared, refused, device, "--data-on-device", other, "--resume", str(mid), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"Resume with --data-on-device {on}, or from an epoch-end checkpoint" in output, output[-3000:]
    assert not (refused / "metrics.json").exists()


_CPU_SCORES = """
import json, sys
import torch
from twotower_lit.export.evaluate import evaluate_model_dir
from twotower_lit.export.format import load_export
model = load_export(sys.argv[1])
users = torch.arange(1, 41)
scores = model.scores(model.user_vectors(model.user_features[users]))
print(json.dumps({"cuda": torch.cuda.is_available(), "torchrec": "torchrec" in sys.modules,
                  "scores": scores.tolist(), "test": evaluate_model_dir(sys.argv[1], sys.argv[2])}))
"""


def test_the_gpu_runs_export_scores_on_a_cpu_only_process(reference, gpu_prepared):
    """The export written by the GPU run, loaded by a process that sees no GPU and imports no
    TorchRec (as a CPU-only serving machine): its test metrics are those the GPU run computed
    (within TF32_ABS, and Recall/NDCG@10 within three users' near-ties: the run evaluated with TF32
    matmuls), and its scores are those this process computes from the same export, to the bit."""
    import torch

    from twotower_lit.export.format import load_export

    proc = subprocess.run([sys.executable, "-c", _CPU_SCORES, str(reference / "model"), str(gpu_prepared)],
                          cwd=REPO, env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cuda"] is False and got["torchrec"] is False
    trained = read_json(reference / "metrics.json")["test"]
    users = got["test"]["ranked_users"]
    assert users > 0
    for key in KEYS:
        # a ranking metric moves by at most 1 / users per user whose cut-off near-tie TF32 reorders
        tolerance = max(TF32_ABS, 3 / users) if "@" in key else TF32_ABS
        assert got["test"][key] == pytest.approx(trained[key], abs=tolerance), key
    model = load_export(str(reference / "model"))
    users = torch.arange(1, 41)
    here = model.scores(model.user_vectors(model.user_features[users]))
    assert torch.equal(torch.tensor(got["scores"], dtype=here.dtype), here)
