"""The training job: data -> DataModule -> LightningModule + TorchRec strategy -> metrics -> export.

`run(cfg)` is what `python -m entrypoints.train` (locally, under torchrun, or in a SageMaker
training job) executes on every rank; rank 0 alone writes metrics, MLflow records and the export.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from twotower_lit.checkpoint import newest_intact_checkpoint
from twotower_lit.config import TrainConfig, parse_bool, to_flat_dict
from twotower_lit.data.batches import FeatureTables
from twotower_lit.data.datamodule import MovieLensDataModule, load_manifest, split_source
from twotower_lit.evaluation import RetrievalEvaluation
from twotower_lit.losses import TwoTowerLoss
from twotower_lit.metrics import PopularityBaseline
from twotower_lit.model import feature_specs
from twotower_lit.module import (MultiStepTwoTowerModule, TwoTowerModule,
                                 check_embedding_optimizer)
from twotower_lit.strategy import TorchRecStrategy, parse_table_sharding, replicated_tables_of
from twotower_lit import tracking

DEFAULT_SYNTHETIC_RATINGS = 100_000


def quiet_known_warnings() -> None:
    """Silence warnings that are understood and harmless here, so real ones stay visible."""
    import logging
    import warnings

    # epoch metrics are synchronised by torchmetrics / all-reduced by the retrieval callback
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
    # the reader's __len__ is exact per worker (see twotower_lit.data.loader)
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fbgemm_gpu.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # the module's hook is the one meant (non-blocking copies of a Batch); the DataModule has none
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule` "
                            r"but have passed in a `LightningDataModule`", module=r"lightning\.pytorch\..*")
    # TorchRec's sharded tables and their fused optimizers' state are ShardedTensors in every
    # TorchRec release this runs on; Lightning's teardown moves that state with `.to()`
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor",
                            category=FutureWarning, module=r"torch\.distributed\._shard\.sharded_tensor\..*")
    # TorchRec's planner announces a future change of its default storage reservation; the plans
    # here are built with that default on purpose: another reservation could change them
    warnings.filterwarnings("ignore", message=r"HeuristicalStorageReservation is known to cause issues",
                            category=FutureWarning, module=r"torchrec\.distributed\.planner\..*")
    # MultiStepTwoTowerModule and the pipelined module take several batches per call by design
    # (their own batch accounting: twotower_lit.module)
    warnings.filterwarnings("ignore", message=r"You are using the `dataloader_iter` step flavor",
                            module=r"lightning\.pytorch\..*")
    for name in ("torchrec.distributed.planner", "torchrec.distributed.comm", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        _drop_log_records(name, "try installing [litlogger]")  # an advertisement
    # TorchRec's KeyedJaggedTensor asks torch.fx whether it is being traced on every batch; nothing is traced
    _drop_log_records("torch.fx._symbolic_trace", "is_fx_tracing will return true for both")


def _drop_log_records(logger: str, text: str) -> None:
    """Drop the records of `logger` whose message contains `text` (once per logger and text)."""
    import logging

    target = logging.getLogger(logger)
    if any(getattr(f, "dropped_text", None) == text for f in target.filters):
        return

    class Drop(logging.Filter):
        dropped_text = text

        def filter(self, record: logging.LogRecord) -> bool:
            return text not in record.getMessage()

    target.addFilter(Drop())


def default_run_name(cfg: TrainConfig) -> str:
    return cfg.tracking.run_name or time.strftime("run-%Y%m%d-%H%M%S")


def resolve_data(cfg: TrainConfig, output_dir: str) -> str:
    """A prepared dataset directory for `cfg.data.data_dir`: used as is when it is prepared already,
    otherwise prepared (raw MovieLens, a download, or synthetic data) into OUTPUT/data.

    Under several processes all ranks call this; a file lock lets one prepare while the others
    wait, and preparing is a no-op when the output is already there with the same options.
    """
    from filelock import FileLock

    from twotower_lit.data.prepare import is_prepared, prepare_dataset

    if cfg.data.data_dir and is_prepared(cfg.data.data_dir):
        return cfg.data.data_dir
    target = os.path.join(output_dir, "data")
    prep = replace(cfg.prepare, data_dir=cfg.data.data_dir, output_dir=target, seed=cfg.seed)
    if not cfg.data.data_dir and not prep.download and not prep.synthetic:
        prep = replace(prep, synthetic=DEFAULT_SYNTHETIC_RATINGS)
        print(f"no --data-dir given: training on a synthetic ml-1m-shaped set of {prep.synthetic:,} ratings "
              f"(pass --data-dir DIR or --download ml-1m for real MovieLens)", flush=True)
    os.makedirs(output_dir, exist_ok=True)
    with FileLock(os.path.join(output_dir, ".prepare.lock")):
        prepare_dataset(prep, target)
    return target


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """The newest intact checkpoint under `checkpoint_dir` (by global step), or None if it holds
    none. Checkpoints that are incomplete, damaged or unsafe to read are passed over, each with a
    printed line saying why, and so is the fallback to an older one
    (`twotower_lit.checkpoint.newest_intact_checkpoint`)."""
    found = newest_intact_checkpoint(checkpoint_dir, report=lambda line: print(line, flush=True))
    return str(found) if found is not None else None


def launch_rank(cfg: TrainConfig) -> int:
    """This process's global rank as the launcher announced it (torchrun/SageMaker set RANK; Lightning's
    own launcher sets NODE_RANK and LOCAL_RANK), known before any process group exists."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) * cfg.distributed.devices + int(os.environ.get("LOCAL_RANK", 0))


LOG_EVERY_N_STEPS = 10  # train_loss (the interval's mean) goes to the logger and the progress bar this often


class TrainingClock(L.Callback):
    """Seconds spent in the training loop itself: from each epoch's start (loader start-up and the
    first batch included) to its last training batch; validation, the sanity check, epoch-end
    checkpoints and process start-up are left out. The host can run a few steps ahead of the GPU
    between logged steps (each logged step waits for the GPU), which is noise over an epoch.
    `epochs` keeps (seconds, optimizer steps) per epoch: the first epoch also pays one-off warm-up
    (kernel selection, communicator set-up), later ones show the steady rate."""

    def __init__(self) -> None:
        self.epochs: List[Tuple[float, int]] = []
        self._start: Optional[float] = None
        self._last: Optional[float] = None
        self._first_step = 0

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start, self._last, self._first_step = time.perf_counter(), None, trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        if self._start is not None and self._last is not None:
            self.epochs.append((self._last - self._start, trainer.global_step - self._first_step))
        self._start = None

    @property
    def seconds(self) -> float:
        return sum(seconds for seconds, _ in self.epochs)

    @property
    def steps(self) -> int:
        """Optimizer steps trained in this process (a resumed run's earlier ones are not here)."""
        return sum(steps for _, steps in self.epochs)


GPU_STEPS_PER_EXECUTION = 16  # --steps-per-execution 0 on GPUs (see PerformanceConfig.steps_per_execution)
GRAPHED_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "sgd")  # FBGEMM's fused ones that keep no host step count


def resolve_steps_per_execution(cfg: TrainConfig, device_type: str) -> int:
    """The optimizer steps per Lightning training_step call this run takes (``0``: by device)."""
    k = cfg.performance.steps_per_execution
    if k < 0:
        raise ValueError(f"--steps-per-execution must be at least 1 (or 0: by device), got {k}")
    return k or (GPU_STEPS_PER_EXECUTION if device_type == "cuda" else 1)


def resolve_cuda_graphs(cfg: TrainConfig, device_type: str, world: int, tables: Optional[FeatureTables]) -> bool:
    """Whether this run's training steps are captured and replayed as CUDA graphs (--cuda-graphs):
    ``on`` refuses a run that cannot, naming what to change; ``auto`` takes them wherever they can
    run: GPU jobs of one process, or of several with every table replicated. (The sharding plan
    is known only once the strategy has sharded the model: `twotower_lit.graphs.plan_refusal`
    checks it then.)"""
    if cfg.performance.cuda_graphs == "off":
        return False
    needs = []
    if device_type != "cuda":
        needs.append("a GPU (--accelerator gpu)")
    if world > 1 and cfg.distributed.gradient_sync != "allreduce":
        needs.append("--gradient-sync allreduce with several processes (DDP's reducer works on the host in "
                     "every backward pass)")
    if cfg.optim.embedding_optimizer not in GRAPHED_EMBEDDING_OPTIMIZERS:
        needs.append(f"--embedding-optimizer {' or '.join(GRAPHED_EMBEDDING_OPTIMIZERS)} (FBGEMM's fused "
                     f"{cfg.optim.embedding_optimizer} passes its step count from the host at every launch)")
    if cfg.optim.lr_schedule != "constant" or cfg.optim.warmup_steps:
        needs.append("a constant learning rate (--lr-schedule constant --warmup-steps 0): TorchRec's fused "
                     "embedding optimizers read the rate when their kernel is launched, so a graph keeps its "
                     "capture's")
    if tables is not None and tables.genres_values is not None and len(tables.genres_values) \
            and int(tables.genres_values.min()) < 1:
        needs.append("genre indices from 1 (this data uses index 0, the row that pads genres in a graph)")
    if cfg.performance.cuda_graphs == "on" and needs:
        raise ValueError(f"--cuda-graphs on needs {'; '.join(needs)}. Change that, or pass --cuda-graphs off")
    return not needs


# GPU memory per training row that `--data-on-device` takes, with margin: the resident split (user
# and item ids as int64, the label as float32: 20 bytes) plus an epoch's order and its gathers
DEVICE_BYTES_PER_ROW = 64


def resolve_data_on_device(cfg: TrainConfig, device_type: str, train_rows: int,
                           device_memory: Optional[int] = None) -> bool:
    """Whether the training batches are built on the training device from a copy of the split
    kept there (--data-on-device; `twotower_lit.data.device_batches`). ``auto`` takes it on GPUs
    when the run samples no negatives (that reader builds rated rows only) and `train_rows` take at
    most a quarter of the GPU's memory (`device_memory`, bytes; read from this process's GPU when not
    given). The GPU's total memory, not its free memory, so that every rank decides alike."""
    choice = str(cfg.performance.data_on_device).strip().lower()
    if choice != "auto":
        try:  # (leniently: the option may come from a SageMaker hyperparameter)
            return parse_bool(choice)
        except argparse.ArgumentTypeError:
            raise ValueError(f"--data-on-device {cfg.performance.data_on_device!r}: choose auto, true or "
                             "false") from None
    if device_type != "cuda" or cfg.data.negatives:
        return False
    if device_memory is None:  # (a launcher may show each process one GPU: then it is device 0)
        index = min(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count() - 1)
        device_memory = torch.cuda.get_device_properties(index).total_memory
    return train_rows * DEVICE_BYTES_PER_ROW <= device_memory // 4


def build_trainer(cfg: TrainConfig, output_dir: str, checkpoint_dir: str, logger,
                  ckpt_path: Optional[str] = None, graphed: bool = False,
                  extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    run = cfg.distributed
    strategy = TorchRecStrategy(sharding=run.sharding, table_sharding=parse_table_sharding(run.table_sharding),
                                data_parallel_below_mb=run.data_parallel_below_mb, gradient_sync=run.gradient_sync,
                                resumed_data_parallel_tables=replicated_tables_of(ckpt_path) if ckpt_path else None,
                                timeout=datetime.timedelta(seconds=run.collective_timeout_s), cuda_graphs=graphed,
                                allreduce_precision=run.allreduce_precision)
    # one callback per trigger: Lightning's ModelCheckpoint takes either a step or an epoch interval
    checkpoints = [L.pytorch.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, filename="epoch{epoch}-end-step{step}", auto_insert_metric_name=False,
        save_on_train_epoch_end=True, save_top_k=-1, every_n_epochs=1)]
    if cfg.output.checkpoint_every_n_steps:
        checkpoints.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=checkpoint_dir, filename="epoch{epoch}-step{step}", auto_insert_metric_name=False,
            every_n_train_steps=cfg.output.checkpoint_every_n_steps, save_top_k=-1))
    # The progress bar redraws when the logged training loss changes (every LOG_EVERY_N_STEPS),
    # not after every step: a redraw costs the host ~0.15 ms (tqdm's refresh and postfix), a few
    # percent of a GPU step, and writes a line to a job's log each time.
    # With several steps per call: logged steps on call boundaries (a multiple of K), and the bar
    # redrawn after every call (its count, the batch index, then moves K at a time).
    k = max(1, cfg.performance.steps_per_execution)  # resolved by `run` (0 = by device: 1 here)
    log_every = k * math.ceil(LOG_EVERY_N_STEPS / k)
    progress = [L.pytorch.callbacks.TQDMProgressBar(refresh_rate=LOG_EVERY_N_STEPS if k == 1 else 1)] \
        if cfg.output.progress else []
    return L.Trainer(
        accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes, strategy=strategy,
        max_epochs=cfg.optim.max_epochs, logger=logger,
        callbacks=[PeerLossReport(checkpoint_dir), *checkpoints, RetrievalEvaluation(cfg.tracking.eval_k),
                   TrainingClock(), *progress, *extra_callbacks],
        enable_progress_bar=cfg.output.progress, enable_model_summary=False, log_every_n_steps=log_every,
        num_sanity_val_steps=1, deterministic=False, default_root_dir=output_dir, use_distributed_sampler=False)


def run(cfg: TrainConfig, callbacks: Sequence[L.Callback] = (),
        run_tags: Optional[Dict[str, str]] = None) -> Optional[Dict]:
    """Train, test, export. Returns metrics on rank 0, None on other ranks.

    `callbacks` are added to the trainer's (a tuner's pruning callback reads the per-epoch
    validation metrics); `run_tags` are set on the MLflow run (e.g. `mlflow.parentRunId` to nest it)."""
    metrics = _train_test_export(cfg, callbacks, run_tags)
    close_process_group()
    return metrics


def close_process_group() -> None:
    """Destroy the job's process group, and with it join its communication threads, while the
    interpreter still runs (after a successful job; a failing one exits through Lightning's
    error handling).

    Lightning leaves the group to the interpreter's exit. Gloo's worker threads then free the
    last collectives' work objects while Python finalises, and a work object launched during a
    backward pass (DDP's or `GradientAverager`'s all-reduce, kept by the last barrier) holds
    Python state that autograd stashes in the thread's state: freeing it takes the GIL, which a
    finalising interpreter does not give back, and the thread's exit through a noexcept
    destructor aborts the process ("terminate called without an active exception", SIGABRT) after
    the job has finished. torchrun then reports a finished job as failed. It happened in about 1
    run in 100 of two processes with a DDP model and in CI. The trainer, strategy and model, which
    hold the group, are garbage once `_train_test_export` has returned: collecting their reference
    cycles first leaves the group without references, so destroying it joins its threads here."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()


def _train_test_export(cfg: TrainConfig, callbacks: Sequence[L.Callback],
                       run_tags: Optional[Dict[str, str]]) -> Optional[Dict]:
    quiet_known_warnings()
    if cfg.loss.kind != "both" and cfg.model.exposure_dims:
        # one objective, one score: the exposure dimensions would only be shrunk by the vector L2
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, exposure_dims=0))
    device_type = "cuda" if cfg.distributed.accelerator in ("gpu", "cuda") or (
        cfg.distributed.accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    check_embedding_optimizer(cfg.optim.embedding_optimizer, device_type)
    cfg = dataclasses.replace(cfg, performance=dataclasses.replace(
        cfg.performance, steps_per_execution=resolve_steps_per_execution(cfg, device_type)))
    if device_type == "cuda":
        # TF32 for the towers' matmuls: ~0.7 ms less GPU time per 64k-row step on an H200
        # (benchmarks/train_throughput.py --matmul-precision high); the embeddings are unaffected
        torch.set_float32_matmul_precision("high" if cfg.performance.tf32 else "highest")
    run_name = default_run_name(cfg)
    output_dir = os.path.abspath(cfg.output.output_dir or os.path.join("outputs", run_name))
    os.environ.setdefault("TWOTOWER_RUN_DIR", output_dir)
    data_dir = resolve_data(cfg, output_dir)
    manifest = load_manifest(data_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    on_device = resolve_data_on_device(cfg, device_type, int(split_source(data_dir, manifest, "train").total_rows))
    cfg = dataclasses.replace(cfg, performance=dataclasses.replace(cfg.performance,
                                                                   data_on_device=str(on_device).lower()))
    dm = MovieLensDataModule(data_dir, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                             negatives=cfg.data.negatives, negative_sampling=cfg.data.negative_sampling, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, side_features=cfg.model.side_features,
                             data_on_device=on_device)
    features = feature_specs(manifest, cfg.model.side_features)
    world = cfg.distributed.devices * cfg.distributed.num_nodes
    total_steps = dm.steps_per_epoch(world) * cfg.optim.max_epochs
    dm.load()  # training-row counts per item: the softmax's log-Q correction
    loss = TwoTowerLoss(cfg.loss.kind, num_items=dm.num_items, negatives=cfg.data.negatives,
                        softmax_weight=cfg.loss.softmax_weight, temperature=cfg.loss.softmax_temperature,
                        vector_l2=cfg.loss.vector_l2, softmax_rows=cfg.loss.softmax_rows,
                        exposure_dims=cfg.model.exposure_dims)
    loss.set_item_counts(dm.item_counts)
    graphed = resolve_cuda_graphs(cfg, device_type, world, dm.tables)
    module_cls, options = TwoTowerModule, {}
    if cfg.performance.steps_per_execution > 1 or graphed:
        module_cls, options = MultiStepTwoTowerModule, {"steps_per_execution": cfg.performance.steps_per_execution,
                                                        "checkpoint_every_n_steps": cfg.output.checkpoint_every_n_steps,
                                                        "graphed_steps": graphed,
                                                        "graphs_required": cfg.performance.cuda_graphs == "on"}
    module = module_cls(features, cfg.model, cfg.optim, total_steps=total_steps, loss=loss, **options)

    uri = tracking.tracking_uri(cfg.tracking.mlflow_uri, output_dir)
    if uri and launch_rank(cfg) == 0:
        tracking.prepare_experiment(uri, output_dir, cfg.tracking.experiment_name)
    # only global rank 0 talks to MLflow (other ranks opening the SQLite store would race on its schema)
    # Metrics are logged asynchronously: MLflow queues them for a background thread and the run's
    # termination (the logger's finalize) waits for the queue. A synchronous call every logged step
    # holds the training loop for a database write or an HTTP round trip: 8.1 against 0.7 ms per
    # call on SQLite, 64.6 against 0.9 ms on a local MLflow server (benchmarks/tracking_bench.py,
    # 2-core VM), every 10 steps of a few milliseconds each on a GPU.
    logger = L.pytorch.loggers.MLFlowLogger(
        experiment_name=cfg.tracking.experiment_name, run_name=run_name, tracking_uri=uri,
        artifact_location=tracking.artifact_location(uri, output_dir), log_model=False, synchronous=False,
        tags=run_tags) \
        if uri and launch_rank(cfg) == 0 else False
    checkpoint_dir = cfg.output.checkpoint_dir or os.path.join(output_dir, "checkpoints")
    ckpt_path = None
    if cfg.output.resume:
        ckpt_path = latest_checkpoint(checkpoint_dir) if cfg.output.resume == "auto" else cfg.output.resume
        if ckpt_path is None:
            print(f"--resume auto: no checkpoint in {checkpoint_dir}; starting from scratch", flush=True)
    trainer = build_trainer(cfg, output_dir, checkpoint_dir, logger, ckpt_path, graphed, callbacks)
    if logger:
        logger.log_hyperparams({k: str(v) for k, v in to_flat_dict(cfg).items()})

    t0 = time.perf_counter()
    with _peer_failures_explained(trainer, checkpoint_dir):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        train_seconds = time.perf_counter() - t0
        test = trainer.test(module, datamodule=dm, verbose=False)[0]
        retrieval = _callback(trainer, RetrievalEvaluation).last.get("test", {})
        state = trainer.strategy.full_model_state_dict()  # collective: gathers the shards to rank 0
    if not trainer.is_global_zero:
        return None

    k = cfg.tracking.eval_k
    clock = _callback(trainer, TrainingClock)
    loop_seconds = clock.seconds
    row_rate = rows_per_step(dm, trainer.world_size, cfg.data.negatives)
    # the steps this process trained: a resumed run's earlier steps (maybe on another number of
    # processes) took no time here
    rows = round(row_rate * clock.steps)
    metrics: Dict = {
        "test": {"auc": test["test_auc"], "logloss": test["test_logloss"], "accuracy": test["test_accuracy"],
                 f"recall@{k}": retrieval[f"recall@{k}"], f"ndcg@{k}": retrieval[f"ndcg@{k}"]},
        "baselines": {"popularity": popularity_metrics(dm, "test", k, trainer.strategy.root_device)},
        "train": {"epochs": trainer.current_epoch, "steps": trainer.global_step, "seconds": round(train_seconds, 2),
                  "world_size": trainer.world_size, "loop_seconds": round(loop_seconds, 2),
                  "data_on_device": dm.data_on_device,
                  # rows through the model (rated + sampled negatives), all ranks, per second of the
                  # training loop; fit_samples_per_s divides by the whole fit instead (validation,
                  # checkpoints and, with several processes, their start-up included)
                  "samples_per_s": round(rows / max(loop_seconds, 1e-9)),
                  # the same per epoch of this run: the first also pays the one-off warm-up
                  "epoch_samples_per_s": [round(row_rate * steps / max(sec, 1e-9)) for sec, steps in clock.epochs],
                  "fit_samples_per_s": round(rows / max(train_seconds, 1e-9)),
                  "cuda_graphs": module.graph_report() if isinstance(module, MultiStepTwoTowerModule) else None},
        "sharding_plan": trainer.strategy.plan_description,
        "data": {"dir": data_dir, "dataset": manifest.get("dataset"), "counts": manifest.get("counts")},
    }
    model_dir = os.path.join(output_dir, "model")
    from twotower_lit.export.writer import export_model

    export = export_model(model_dir, state, features, cfg.model, dm, metrics,
                          extra_config={"run_name": run_name})
    metrics["model_version"] = export["model_version"]
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
    if cfg.output.package:
        from twotower_lit.export.package import package_model

        package_model(model_dir, os.path.join(output_dir, "model.tar.gz"))
    if logger:
        # the exported model is stored once: in the registered pyfunc when there is one
        tracking.log_run_outputs(logger.experiment, logger.run_id, output_dir, model_dir, data_dir, manifest,
                                 trainer.strategy.plan_description, metrics, k,
                                 log_export=not cfg.tracking.registered_model_name)
        if cfg.tracking.registered_model_name:
            metrics["registered_version"] = tracking.register_model(uri, logger.run_id, model_dir,
                                                                    cfg.tracking.registered_model_name)
        logger.finalize("success")
        metrics["mlflow"] = {"tracking_uri": uri, "run_id": logger.run_id}
    _print_summary(metrics, output_dir, k)
    return metrics


class PeerLostError(RuntimeError):
    """Another rank of the job died (crash, OOM kill, lost node) while this one was waiting on it."""


_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "Timed out", "timed out", "DistNetworkError", "failed to recv", "Socket Timeout")


def _peer_lost_message(error: BaseException, trainer: L.Trainer, checkpoint_dir: str) -> Optional[str]:
    """What to tell the user when `error` is a collective failing because another rank died, else None."""
    if not isinstance(error, (RuntimeError, torch.distributed.DistError)) or trainer.world_size < 2:
        return None
    text = f"{type(error).__name__}: {error}"
    if not any(p in text for p in _PEER_LOST):
        return None
    return (f"rank {trainer.global_rank} of {trainer.world_size} lost contact with another rank (it crashed, was "
            f"killed, or its node went away). Checkpoints are in {checkpoint_dir}: rerun the same command with "
            f"`--resume auto` to continue from the last complete one. Underlying error: {text[:500]}")


class PeerLossReport(L.Callback):
    """Prints the lost-peer explanation as soon as Lightning sees the failure.

    Lightning calls callbacks' `on_exception` first, then closes the loggers (the MLflow logger
    flushes its queue and records the failed run: seconds on a loaded machine), and only then lets the
    exception reach `_peer_failures_explained`. Meanwhile Lightning's launcher, which polls the
    ranks every 5 s, may SIGKILL this process because the other rank died; printing here makes sure
    the explanation reaches the job's log first."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        message = _peer_lost_message(exception, trainer, self.checkpoint_dir)
        if message:
            print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _peer_failures_explained(trainer: L.Trainer, checkpoint_dir: str):
    """Turn a collective's low-level failure into an error that says what happened and what to do."""
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as e:
        message = _peer_lost_message(e, trainer, checkpoint_dir)
        if message:
            raise PeerLostError(message) from e
        raise


def _callback(trainer: L.Trainer, kind: type) -> Any:
    """The trainer's callback of class `kind` (`build_trainer` adds one of each)."""
    return next(c for c in trainer.callbacks if isinstance(c, kind))


def rows_per_step(dm: MovieLensDataModule, world_size: int, negatives: int) -> float:
    """Rows through the model per optimizer step, all ranks together (rated + sampled negatives)."""
    per_rank_batches = dm.steps_per_epoch(world_size)
    per_epoch = math.ceil(dm.source("train").total_rows / world_size) * world_size
    return per_epoch * (1 + negatives) / max(per_rank_batches, 1)


def popularity_metrics(dm: MovieLensDataModule, split: str, k: int,
                       device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    dm.load()
    train, rows = dm.splits["train"], dm.splits[split]
    baseline = PopularityBaseline(train["item"].astype(np.int64), train["label"], dm.num_items)
    out = baseline.evaluate(rows["user"].astype(np.int64), rows["item"].astype(np.int64), rows["label"],
                            dm.seen, dm.positives[split], k, device)
    out.pop("ranked_users", None)
    return out


def _print_summary(metrics: Dict, output_dir: str, k: int) -> None:
    if metrics.get("train", {}).get("data_on_device"):
        print("\ntraining batches: built on the device from a copy of the training split kept there "
              "(--data-on-device)")
    graphs = metrics.get("train", {}).get("cuda_graphs")
    if graphs and "refused" in graphs:
        print(f"\nCUDA graphs: off, {graphs['refused']}")
    elif graphs:
        other = (f", {graphs['other_shapes']} eager for other shapes (first: {graphs['first_other_shape']})"
                 if graphs["other_shapes"] else "")
        print(f"\nCUDA graphs: {graphs['replays']} training steps replayed, {graphs['eager_steps']} eager "
              f"(warm-up){other}")
    names = ("auc", "logloss", "accuracy", f"recall@{k}", f"ndcg@{k}")
    print("\n" + "metric".ljust(12) + "two-tower".rjust(12) + "popularity".rjust(12))
    for n in names:
        print(n.ljust(12) + f"{metrics['test'][n]:12.4f}" + f"{metrics['baselines']['popularity'][n]:12.4f}")
    lines = [f"\nexported model: {os.path.join(output_dir, 'model')}",
             f"metrics: {os.path.join(output_dir, 'metrics.json')}"]
    tracked = metrics.get("mlflow")
    if tracked:
        lines.append(f"training curves: {os.path.join(output_dir, 'training_curves.png')}")
        uri = tracked["tracking_uri"]
        if uri.startswith("sqlite:"):
            # (the embedded store's artifacts are files beside it: the UI serves them from there)
            lines.append(f"MLflow run {tracked['run_id']}: mlflow ui --backend-store-uri {uri} "
                         f"--default-artifact-root {tracking.artifact_location(uri, output_dir)}")
        else:
            lines.append(f"MLflow run {tracked['run_id']} on {uri}")
    print("\n".join(lines), flush=True)
