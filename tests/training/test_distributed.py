"""Two gloo processes on CPU: launch modes, distributed evaluation, export gathering,
mid-epoch resume after a killed rank, and checkpoint resharding (2 -> 1 and 1 -> 2 ranks)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port
from tests.training.conftest import REPO, prepare_synthetic, read_json, run_cli

KEYS = ("auc", "logloss", "accuracy", "recall@10", "ndcg@10")
ARGS = ["--batch-size", "256", "--progress", "false", "--negatives", "2", "--registered-model-name", "",
        "--collective-timeout-s", "60"]


@pytest.fixture(scope="module")
def small_prepared(synthetic_movielens, tmp_path_factory) -> Path:
    return prepare_synthetic(synthetic_movielens, tmp_path_factory, 12_000, seed=2)


def train(data, out, *extra, devices=2):
    return run_cli("entrypoints.train", ["--data-dir", str(data), "--output-dir", str(out), "--accelerator", "cpu",
                                         "--devices", str(devices), *ARGS, *extra])


@pytest.fixture(scope="module")
def two_rank_run(small_prepared, tmp_path_factory):
    """The uninterrupted reference: 2 ranks, row-wise tables, 2 epochs, checkpoints every 7 steps."""
    out = tmp_path_factory.mktemp("ref") / "out"
    train(small_prepared, out, "--max-epochs", "2", "--sharding", "row_wise", "--checkpoint-every-n-steps", "7")
    return out


def test_two_ranks_metrics_equal_single_process_evaluation_of_the_export(two_rank_run, small_prepared):
    """Distributed evaluation (data spread over ranks) and the gathered export agree with a
    single-process evaluation of the exported artifact."""
    metrics = read_json(two_rank_run / "metrics.json")
    assert metrics["train"]["world_size"] == 2
    assert metrics["train"]["data_on_device"] is False  # --data-on-device auto streams on CPUs
    assert {d["sharding_type"] for d in metrics["sharding_plan"].values()} == {"row_wise"}
    assert all(len(d["ranks"]) == 2 for d in metrics["sharding_plan"].values())
    proc = run_cli("entrypoints.evaluate", ["--model-dir", str(two_rank_run / "model"), "--data-dir",
                                            str(small_prepared)])
    single = json.loads(proc.stdout)["test"]
    for key in KEYS:
        assert single[key] == pytest.approx(metrics["test"][key], abs=2e-4), key


def _step(checkpoint: Path) -> int:
    return int(re.search(r"step(\d+)", checkpoint.name).group(1))


def _latest_step_checkpoint(ckpt_dir: Path, min_step: int):
    for path in sorted(ckpt_dir.glob("*/trainer_state.pt")):
        if _step(path.parent) >= min_step:
            return path.parent
    return None


def test_sigkill_of_one_rank_fails_fast_and_resume_reproduces_the_run(two_rank_run, small_prepared, tmp_path):
    reference = read_json(two_rank_run / "metrics.json")
    steps_per_epoch = reference["train"]["steps"] // 2
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "entrypoints.train", "--data-dir", str(small_prepared), "--output-dir", str(out),
           "--accelerator", "cpu", "--devices", "2", *ARGS, "--max-epochs", "2", "--sharding", "row_wise",
           "--checkpoint-every-n-steps", "7"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    # wait for a mid-epoch checkpoint in the second epoch, then kill rank 1
    while _latest_step_checkpoint(out / "checkpoints", steps_per_epoch + 1) is None:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    rank1 = [c for c in children if c.environ().get("LOCAL_RANK") == "1"]
    assert rank1, "rank 1 not found"
    killed_at = time.time()
    rank1[0].send_signal(signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after one rank was killed")
    exit_seconds = time.time() - killed_at
    assert proc.returncode != 0
    # rank 0 names the failure and the way out (Lightning's launcher may also report the dead child)
    assert "lost contact with another rank" in output and "--resume auto" in output, output[-3000:]
    assert exit_seconds < 90
    assert not (out / "metrics.json").exists()

    train(small_prepared, out, "--max-epochs", "2", "--sharding", "row_wise", "--checkpoint-every-n-steps", "7",
          "--resume", "auto")
    resumed = read_json(out / "metrics.json")
    assert resumed["train"]["steps"] == reference["train"]["steps"]
    for key in KEYS:
        assert resumed["test"][key] == pytest.approx(reference["test"][key], abs=1e-6), key


def _mid_epoch_checkpoints(run: Path, steps_per_epoch: int):
    return [p.parent for p in (run / "checkpoints").glob("epoch0-step*/trainer_state.pt")
            if _step(p.parent) % steps_per_epoch]


def test_data_on_device_with_several_steps_per_call_trains_every_step_and_resumes_mid_epoch(
        two_rank_run, small_prepared, tmp_path):
    """--data-on-device (batches gathered on the training device; CPU here) with 5 optimizer steps
    per Lightning call: the same number of steps as the streaming loader, a model that beats
    popularity, checkpoints every 7 steps where they are with one step per call (calls end there
    too), and an exact mid-epoch resume with 3 steps per call (its first call stops at the next
    multiple of 3). One step per call gives the same run (tests/training/test_training.py)."""
    reference = read_json(two_rank_run / "metrics.json")
    steps_per_epoch = reference["train"]["steps"] // 2
    assert steps_per_epoch % 5 and steps_per_epoch > 14
    extra = ["--max-epochs", "1", "--sharding", "row_wise", "--negatives", "0", "--data-on-device", "true"]
    full = tmp_path / "full"
    train(small_prepared, full, *extra, "--checkpoint-every-n-steps", "7", "--steps-per-execution", "5")
    mid = _mid_epoch_checkpoints(full, steps_per_epoch)
    assert sorted(map(_step, mid)) == list(range(7, steps_per_epoch, 7))
    resumed = tmp_path / "resumed"
    train(small_prepared, resumed, *extra, "--steps-per-execution", "3", "--resume", str(max(mid, key=_step)))
    a, b = read_json(full / "metrics.json"), read_json(resumed / "metrics.json")
    assert a["train"]["data_on_device"] is b["train"]["data_on_device"] is True
    assert a["train"]["steps"] == b["train"]["steps"] == steps_per_epoch
    assert a["test"]["auc"] > a["baselines"]["popularity"]["auc"]
    for key in KEYS:
        assert b["test"][key] == pytest.approx(a["test"][key], abs=1e-6), key


def test_a_mid_epoch_checkpoint_refuses_the_other_training_reader(two_rank_run, small_prepared, tmp_path):
    """A checkpoint written mid-epoch by the streaming loader, resumed with the device-resident
    reader (which orders the epoch's rows otherwise): the job stops before training, naming the
    option that resumes it."""
    steps_per_epoch = read_json(two_rank_run / "metrics.json")["train"]["steps"] // 2
    mid = max(_mid_epoch_checkpoints(two_rank_run, steps_per_epoch), key=_step)
    out = tmp_path / "resumed"
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.train", "--data-dir", str(small_prepared), "--output-dir", str(out),
         "--accelerator", "cpu", "--devices", "1", *ARGS, "--sharding", "row_wise", "--negatives", "0",
         "--data-on-device", "true", "--resume", str(mid)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (f"stopped {_step(mid)} batches into epoch 0 with its training batches streamed from the shards, and "
            f"this run's are built on the device") in output, output[-3000:]
    assert "Resume with --data-on-device false, or from an epoch-end checkpoint" in output
    assert not (out / "metrics.json").exists()


def test_epoch_end_checkpoint_resumes_the_remaining_epochs(two_rank_run, small_prepared, tmp_path):
    """A checkpoint written at the end of the first epoch trains the second one when resumed
    (Lightning's loop state of an end-of-epoch checkpoint would otherwise end the run untrained)."""
    reference = read_json(two_rank_run / "metrics.json")
    first = next((two_rank_run / "checkpoints").glob("epoch0-end-*/trainer_state.pt")).parent
    out = tmp_path / "resumed"
    train(small_prepared, out, "--max-epochs", "2", "--sharding", "row_wise", "--resume", str(first))
    got = read_json(out / "metrics.json")
    assert got["train"]["steps"] == reference["train"]["steps"]
    assert len(got["train"]["epoch_samples_per_s"]) == 1  # one epoch trained in this process
    # the rate counts this process's steps only, not those trained before the checkpoint
    assert got["train"]["samples_per_s"] == pytest.approx(got["train"]["epoch_samples_per_s"][0], rel=1e-3)
    for key in KEYS:
        assert got["test"][key] == pytest.approx(reference["test"][key], abs=1e-6), key


def test_checkpoint_of_two_ranks_loads_on_one_rank_with_another_plan(two_rank_run, small_prepared, tmp_path):
    final = next((two_rank_run / "checkpoints").glob("epoch1-end-*/trainer_state.pt")).parent
    out = tmp_path / "one"
    train(small_prepared, out, "--max-epochs", "2", "--sharding", "table_wise", "--resume", str(final), devices=1)
    reference, got = read_json(two_rank_run / "metrics.json"), read_json(out / "metrics.json")
    assert {d["sharding_type"] for d in got["sharding_plan"].values()} == {"table_wise"}
    for key in KEYS:
        assert got["test"][key] == pytest.approx(reference["test"][key], abs=2e-4), key


def test_checkpoint_of_another_model_is_refused_before_loading(two_rank_run, small_prepared, tmp_path):
    final = next((two_rank_run / "checkpoints").glob("epoch1-end-*/trainer_state.pt")).parent
    with pytest.raises(AssertionError, match=r"holds another model than this run builds: --embedding-dim 64 there, "
                                             r"32 here; --exposure-dims 16 there, 8 here"):
        train(small_prepared, tmp_path / "other", "--max-epochs", "2", "--embedding-dim", "32", "--exposure-dims", "8",
              "--resume", str(final), devices=1)


def test_checkpoint_of_one_rank_loads_on_two_ranks(small_prepared, tmp_path):
    one = tmp_path / "one"
    train(small_prepared, one, "--max-epochs", "1", "--sharding", "table_wise", devices=1)
    final = next((one / "checkpoints").glob("epoch0-end-*/trainer_state.pt")).parent
    two = tmp_path / "two"
    train(small_prepared, two, "--max-epochs", "1", "--sharding", "column_wise", "--resume", str(final))
    a, b = read_json(one / "metrics.json"), read_json(two / "metrics.json")
    assert {d["sharding_type"] for d in b["sharding_plan"].values()} == {"column_wise"}
    assert b["train"]["world_size"] == 2
    for key in KEYS:
        assert b["test"][key] == pytest.approx(a["test"][key], abs=2e-4), key


def test_launcher_torchrun_restarts_the_job_under_torchrun(small_prepared, tmp_path):
    """``--launcher torchrun`` (the default on GPUs): the command restarts itself under torchrun,
    which starts both ranks at once, instead of Lightning starting the second inside fit."""
    out = tmp_path / "out"
    proc = run_cli("entrypoints.train", ["--data-dir", str(small_prepared), "--output-dir", str(out),
                                         "--accelerator", "cpu", "--devices", "2", "--launcher", "torchrun",
                                         "--max-epochs", "1", *ARGS])
    assert "starting 2 processes under torchrun" in proc.stdout
    metrics = read_json(out / "metrics.json")
    assert metrics["train"]["world_size"] == 2 and metrics["test"]["auc"] > 0.5


def test_which_jobs_restart_under_torchrun():
    from entrypoints.train import parse_args, torchrun_command

    def command(*args, environ=None, gpus=2):
        return torchrun_command(parse_args(list(args)), list(args), environ or {}, gpus)

    cmd = command("--devices", "2", "--accelerator", "gpu")
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5].endswith(os.path.join("entrypoints", "train.py")) and cmd[6:] == ["--devices", "2", "--accelerator",
                                                                                     "gpu"]
    assert command("--devices", "2") is not None  # accelerator auto, GPUs present
    assert command("--devices", "2", "--accelerator", "cpu", "--launcher", "torchrun") is not None
    # run here: one device; CPUs or too few GPUs unless asked; Lightning's launcher asked for; already a rank
    assert command("--accelerator", "gpu") is None
    assert command("--devices", "2", "--accelerator", "cpu") is None
    assert command("--devices", "4", "--accelerator", "gpu") is None
    assert command("--devices", "2", gpus=0) is None
    assert command("--devices", "2", "--launcher", "lightning") is None
    assert command("--devices", "2", environ={"LOCAL_RANK": "0"}) is None
    assert command("--devices", "2", environ={"SLURM_NTASKS": "2"}) is None
    assert command("--devices", "2", "--num-nodes", "2") is None
    with pytest.raises(ValueError, match="start torchrun on every node"):
        command("--devices", "2", "--num-nodes", "2", "--launcher", "torchrun")


def test_two_nodes_with_rendezvous_variables(small_prepared, tmp_path):
    """Two 'nodes' on this machine, each a torchrun agent with one process, joined through the
    standard rendezvous settings (master address/port, node rank)."""
    out = tmp_path / "out"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "entrypoints.train",
               "--data-dir", str(small_prepared), "--output-dir", str(out), "--accelerator", "cpu",
               "--devices", "1", "--num-nodes", "2", "--max-epochs", "1", *ARGS]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert read_json(out / "metrics.json")["train"]["world_size"] == 2


def test_data_parallel_tables_train_export_and_resume(small_prepared, tmp_path):
    """--sharding data_parallel: every table replicated on both ranks (no all-to-all), trained by
    the embedding optimizer as a plain optimizer on DDP-averaged gradients. The export agrees with
    the distributed evaluation, an epoch-end checkpoint resumes to the same run, a resume without
    sharding options keeps the tables replicated (on one rank too), and resuming with a table
    sharded otherwise fails with a message instead of dropping its optimizer state."""
    full = tmp_path / "full"
    train(small_prepared, full, "--max-epochs", "2", "--sharding", "data_parallel")
    reference = read_json(full / "metrics.json")
    plan = reference["sharding_plan"]
    assert {d["sharding_type"] for d in plan.values()} == {"data_parallel"} and len(plan) == 8
    assert reference["test"]["auc"] > reference["baselines"]["popularity"]["auc"]
    proc = run_cli("entrypoints.evaluate", ["--model-dir", str(full / "model"), "--data-dir", str(small_prepared)])
    single = json.loads(proc.stdout)["test"]
    for key in KEYS:
        assert single[key] == pytest.approx(reference["test"][key], abs=2e-4), key

    first = next((full / "checkpoints").glob("epoch0-end-*/trainer_state.pt")).parent
    resumed = tmp_path / "resumed"
    train(small_prepared, resumed, "--max-epochs", "2", "--sharding", "data_parallel", "--resume", str(first))
    got = read_json(resumed / "metrics.json")
    assert got["train"]["steps"] == reference["train"]["steps"]
    for key in KEYS:
        assert got["test"][key] == pytest.approx(reference["test"][key], abs=1e-6), key

    # resumed without sharding options, here on one rank, the tables stay replicated
    final = next((full / "checkpoints").glob("epoch1-end-*/trainer_state.pt")).parent
    one = tmp_path / "one"
    train(small_prepared, one, "--max-epochs", "2", "--resume", str(final), devices=1)
    got = read_json(one / "metrics.json")
    assert {d["sharding_type"] for d in got["sharding_plan"].values()} == {"data_parallel"}
    for key in KEYS:
        assert got["test"][key] == pytest.approx(reference["test"][key], abs=2e-4), key

    with pytest.raises(AssertionError, match="resume it with the same data_parallel tables"):
        train(small_prepared, tmp_path / "other", "--max-epochs", "2", "--table-sharding", "user:table_wise",
              "--resume", str(first))


def _threads() -> list:
    """Names of this process's threads (Linux)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    return names


def _rank_of_a_job(rank: int, port: int, data: str, out: str, options: list) -> None:
    """One rank of a two-process job run in this process (Lightning's environment variables, as
    a launcher sets them); records what is left of the process group once `run` has returned."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    from entrypoints.train import parse_args
    from twotower_lit.training import run

    run(parse_args(["--data-dir", data, "--output-dir", out, "--accelerator", "cpu", "--devices", "2",
                    "--max-epochs", "1", "--mlflow-uri", "none", "--package", "false", *ARGS, *options]))
    left = {"initialized": dist.is_initialized(), "gloo_threads": [t for t in _threads() if "gloo" in t]}
    with open(os.path.join(out, f"left-rank{rank}.json"), "w") as f:
        json.dump(left, f)


@pytest.mark.parametrize("options", [["--gradient-sync", "allreduce", "--table-sharding", "user:data_parallel"],
                                     ["--gradient-sync", "ddp"]], ids=["allreduce", "ddp"])
def test_a_finished_job_joins_its_communication_threads_before_exit(small_prepared, tmp_path, options):
    """Gloo's threads must not outlive the job into the interpreter's exit, where freeing the last
    collectives' work could abort a finished process (`training.close_process_group`): nothing
    (gradient averaging, DDP, a replicated table's lookup) may keep the process group alive."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_rank_of_a_job, args=(free_port(), str(small_prepared), str(out), options), nprocs=2, join=True)
    assert read_json(out / "metrics.json")["train"]["world_size"] == 2
    for rank in (0, 1):
        assert read_json(out / f"left-rank{rank}.json") == {"initialized": False, "gloo_threads": []}, rank
