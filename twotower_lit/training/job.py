"""The training job, read top to bottom: resolve the run plan once, build data, model, strategy and
trainer from it, fit, test, export, report.

`run(cfg)` is what `python -m entrypoints.train` (locally, under torchrun, or in a SageMaker training
job) executes on every rank; rank 0 alone writes metrics, MLflow records and the export.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import lightning as L
import psutil
import torch
import torch.distributed as dist

from twotower_lit import patches, tracking
from twotower_lit.config import TrainConfig
from twotower_lit.options import to_flat_dict
from twotower_lit.data.datamodule import MovieLensDataModule, genre_ids_from_one, load_manifest, split_source
from twotower_lit.distributed import TorchRecStrategy
from twotower_lit.distributed.candidates import AllRanks
from twotower_lit.distributed.checkpoint import is_checkpoint_dir, newest_intact_checkpoint
from twotower_lit.distributed.checkpointing import replicated_tables_of
from twotower_lit.evaluation import RetrievalEvaluation
from twotower_lit.losses import TwoTowerLoss
from twotower_lit.model import feature_specs
from twotower_lit.training.callbacks import (BestEpoch, JobPhases, PeerLossReport, TrainingClock, callback_of,
                                             peer_failures_explained)
from twotower_lit.training.module import TwoTowerModule
from twotower_lit.training.plan import RunPlan, resolve_plan
from twotower_lit.training.quiet import quiet_known_warnings
from twotower_lit.training.report import collect_metrics, print_summary
from twotower_lit.training.steps import EagerSteps, GraphedSteps

DEFAULT_SYNTHETIC_RATINGS = 100_000
_first_run = True
LOG_EVERY_N_STEPS = 10  # train_loss (the interval's mean) goes to the logger and the progress bar this often


def run(cfg: TrainConfig, callbacks: Sequence[L.Callback] = (),
        run_tags: Optional[Dict[str, str]] = None) -> Optional[Dict]:
    """Train, test, export. Returns metrics on rank 0, None on other ranks.

    `callbacks` are added to the trainer's (a tuner's pruning callback reads the per-epoch
    validation metrics); `run_tags` are set on the MLflow run (e.g. `mlflow.parentRunId` to nest it)."""
    metrics = _run(cfg, callbacks, run_tags)
    close_process_group()
    return metrics


def _run(cfg: TrainConfig, callbacks: Sequence[L.Callback], run_tags: Optional[Dict[str, str]]) -> Optional[Dict]:
    global _first_run
    # (the interpreter's start-up counts for the first job of a process, not for a tuner's later trials)
    phases = JobPhases(psutil.Process().create_time() if _first_run else None)
    _first_run = False
    patches.require_upstream()
    quiet_known_warnings()
    run_name = cfg.tracking.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    output_dir = os.path.abspath(cfg.output.output_dir or os.path.join("outputs", run_name))
    os.environ.setdefault("TWOTOWER_RUN_DIR", output_dir)
    data_dir = resolve_data(cfg, output_dir)
    manifest = load_manifest(data_dir)
    features = feature_specs(manifest, cfg.model.side_features)
    checkpoint_dir = cfg.output.checkpoint_dir or os.path.join(output_dir, "checkpoints")
    resume_from = resolve_resume(cfg.output.resume, checkpoint_dir)
    plan = resolve_plan(cfg, run_name, output_dir, checkpoint_dir, {f.name: f.num_embeddings for f in features},
                        int(split_source(data_dir, manifest, "train").total_rows),
                        genre_ids_from_one(data_dir, manifest), resume_from,
                        replicated_tables_of(resume_from) if resume_from else None)
    rank = launch_rank(cfg)
    if rank == 0:
        print("\n".join(plan.lines()), flush=True)
    if plan.device_type == "cuda":
        torch.set_float32_matmul_precision("high" if cfg.performance.tf32 else "highest")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = MovieLensDataModule(data_dir, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                             negatives=cfg.data.negatives, negative_sampling=cfg.data.negative_sampling,
                             negative_power=cfg.data.negative_power,
                             seed=cfg.seed, num_workers=cfg.data.num_workers, side_features=cfg.model.side_features,
                             data_on_device=plan.data_on_device, manifest=manifest)
    phases.lap("data preparation and plan")
    dm.load()  # training-row counts per item: the softmax's log-Q correction
    phases.lap("data loading")
    module = build_module(cfg, plan, dm, features)
    uri = tracking.tracking_uri(cfg.tracking.mlflow_uri, output_dir)
    logger = build_logger(cfg, plan, uri, run_tags) if uri and rank == 0 else False
    trainer = build_trainer(cfg, plan, logger, [phases, *callbacks])
    if logger:
        logger.log_hyperparams({**{k: str(v) for k, v in to_flat_dict(cfg).items()},
                                **{f"plan.{k}": str(v) for k, v in plan.describe().items()}})
    phases.lap("model, logger and trainer")

    start = time.perf_counter()
    with peer_failures_explained(trainer, checkpoint_dir):
        trainer.fit(module, datamodule=dm, ckpt_path=plan.resume_from)
        fit_seconds = time.perf_counter() - start
        phases.end_fit(callback_of(trainer, TrainingClock).seconds)
        restore_best_epoch(trainer)
        phases.lap("best epoch restored")
        test = trainer.test(module, datamodule=dm, verbose=False)[0]
        phases.lap("test metrics and full-ranking evaluation")
        state = trainer.strategy.full_model_state_dict()  # collective: gathers the shards to rank 0
        phases.lap("weights gathered")
    if not trainer.is_global_zero:
        return None

    metrics = collect_metrics(cfg, plan, trainer, module, dm, test, fit_seconds)
    phases.lap("popularity baseline and metrics")
    model_dir = os.path.join(output_dir, "model")
    from twotower_lit.export.writer import export_model

    export = export_model(model_dir, state, features, module.model_cfg, dm, metrics,
                          extra_config={"run_name": run_name})
    metrics["model_version"] = export["model_version"]
    if cfg.output.package:
        from twotower_lit.serving.package import package_model

        package_model(model_dir, os.path.join(output_dir, "model.tar.gz"))
    phases.lap("export")
    # (what tracking takes is known after it: it is written into metrics.json again at the end)
    metrics["train"]["phases"] = phases.rounded()
    write_metrics(output_dir, metrics)
    if logger:
        # the exported model is stored once: in the registered pyfunc when there is one
        tracking.log_run_outputs(logger.experiment, logger.run_id, output_dir, model_dir, data_dir, dm.manifest,
                                 trainer.strategy.plan_description, metrics, cfg.tracking.eval_k,
                                 log_export=not cfg.tracking.registered_model_name)
        if cfg.tracking.registered_model_name:
            metrics["registered_version"] = tracking.register_model(uri, logger.run_id, model_dir,
                                                                    cfg.tracking.registered_model_name)
        logger.finalize("success")
        metrics["mlflow"] = {"tracking_uri": uri, "run_id": logger.run_id}
        phases.lap("tracking")
        metrics["train"]["phases"] = phases.rounded()
        write_metrics(output_dir, metrics)
    print_summary(metrics, output_dir, cfg.tracking.eval_k)
    return metrics


def build_module(cfg: TrainConfig, plan: RunPlan, dm: MovieLensDataModule, features) -> TwoTowerModule:
    """The LightningModule of this plan: its loss, its model options, its step runner."""
    loss = TwoTowerLoss(cfg.loss.kind, num_items=dm.num_items, negatives=cfg.data.negatives,
                        softmax_weight=cfg.loss.softmax_weight, temperature=cfg.loss.softmax_temperature,
                        vector_l2=cfg.loss.vector_l2, softmax_rows=cfg.loss.softmax_rows,
                        exposure_dims=plan.exposure_dims,
                        candidates=AllRanks() if plan.global_candidates else None)
    loss.set_item_counts(dm.item_counts, dm.negative_probabilities)
    k, every = plan.steps_per_execution, cfg.output.checkpoint_every_n_steps
    if plan.cuda_graphs:
        multi = [f for f in features if f.pooling == "mean"]
        steps = GraphedSteps(k, every, multi_valued=multi[0] if multi else None)
    else:
        steps = EagerSteps(k, every)
    total_steps = dm.steps_per_epoch(plan.world_size) * cfg.optim.max_epochs
    return TwoTowerModule(features, dataclasses.replace(cfg.model, exposure_dims=plan.exposure_dims), cfg.optim,
                          total_steps=total_steps, loss=loss, steps=steps)


def build_logger(cfg: TrainConfig, plan: RunPlan, uri: str, run_tags: Optional[Dict[str, str]]):
    """Lightning's MLflow logger, on global rank 0 only (other ranks opening the SQLite store would
    race on its schema). Metrics are logged asynchronously: a synchronous write every logged step
    would hold the training loop for a database write or an HTTP round trip
    (`benchmarks/tracking_bench.py`)."""
    tracking.prepare_experiment(uri, plan.output_dir, cfg.tracking.experiment_name)
    return L.pytorch.loggers.MLFlowLogger(
        experiment_name=cfg.tracking.experiment_name, run_name=plan.run_name, tracking_uri=uri,
        artifact_location=tracking.artifact_location(uri, plan.output_dir), log_model=False, synchronous=False,
        tags=run_tags)


def build_trainer(cfg: TrainConfig, plan: RunPlan, logger, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    strategy = TorchRecStrategy(table_kinds=plan.table_kinds, gradient_sync=cfg.distributed.gradient_sync,
                                allreduce_precision=cfg.distributed.allreduce_precision,
                                for_capture=plan.cuda_graphs,
                                timeout=datetime.timedelta(seconds=cfg.distributed.collective_timeout_s))
    # one callback per trigger: Lightning's ModelCheckpoint takes either a step or an epoch interval.
    # Every epoch's is kept, under a name known before it is written (no version suffix: a
    # checkpoint of the same epoch and step is replaced), which the best-epoch record points to.
    checkpoints = [L.pytorch.callbacks.ModelCheckpoint(
        dirpath=plan.checkpoint_dir, filename="epoch{epoch}-end-step{step}", auto_insert_metric_name=False,
        save_on_train_epoch_end=True, save_top_k=-1, every_n_epochs=1, enable_version_counter=False)]
    best = BestEpoch(cfg.optim.best_metric, cfg.tracking.eval_k, cfg.optim.best_auc_tolerance,
                     cfg.optim.early_stopping_patience, checkpoints[0])
    if cfg.output.checkpoint_every_n_steps:
        checkpoints.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=plan.checkpoint_dir, filename="epoch{epoch}-step{step}", auto_insert_metric_name=False,
            every_n_train_steps=cfg.output.checkpoint_every_n_steps, save_top_k=-1))
    # The progress bar redraws when the logged loss changes, not after every step (a redraw is host
    # time on a host-bound GPU step, and a line in a job's log); with K steps per call, logged steps
    # fall on call boundaries and the bar moves K at a time.
    k = plan.steps_per_execution
    log_every = k * math.ceil(LOG_EVERY_N_STEPS / k)
    progress = [L.pytorch.callbacks.TQDMProgressBar(refresh_rate=LOG_EVERY_N_STEPS if k == 1 else 1)] \
        if cfg.output.progress else []
    return L.Trainer(
        accelerator=cfg.distributed.accelerator, devices=cfg.distributed.devices,
        num_nodes=cfg.distributed.num_nodes, strategy=strategy, max_epochs=cfg.optim.max_epochs, logger=logger,
        callbacks=[PeerLossReport(plan.checkpoint_dir), *checkpoints, RetrievalEvaluation(cfg.tracking.eval_k),
                   best, TrainingClock(), *progress, *extra_callbacks],
        enable_progress_bar=cfg.output.progress, enable_model_summary=False, log_every_n_steps=log_every,
        num_sanity_val_steps=1, deterministic=False, default_root_dir=plan.output_dir, use_distributed_sampler=False)


def write_metrics(output_dir: str, metrics: Dict) -> None:
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)


def restore_best_epoch(trainer: L.Trainer) -> None:
    """After fit, put the best epoch's weights (`BestEpoch`) into the sharded model on every rank
    (collective), so that the test metrics and the export are that epoch's; nothing to load when
    it is the last one. Rank 0 repeats its log line last: a SageMaker tuning job takes the last
    value of its objective."""
    record = callback_of(trainer, BestEpoch)
    best = record.best()
    if best is None:
        return
    if best["epoch"] != record.history[-1]["epoch"]:
        if not is_checkpoint_dir(Path(best["path"])):
            raise FileNotFoundError(f"the best epoch ({best['epoch']}, by {record.name}) was checkpointed to "
                                    f"{best['path']}, which is no longer there: restore it, or pass "
                                    f"--best-metric last to export the last epoch")
        trainer.strategy.load_model_weights(best["path"])
    if trainer.is_global_zero:
        print(record.line(best), flush=True)


def resolve_data(cfg: TrainConfig, output_dir: str) -> str:
    """A prepared dataset directory for `cfg.data.data_dir`: used as is when it is prepared already,
    otherwise prepared (raw MovieLens, a download, or synthetic data) into OUTPUT/data.

    Under several processes all ranks call this; a file lock lets one prepare while the others
    wait, and preparing is a no-op when the output is already there with the same options."""
    from filelock import FileLock

    from twotower_lit.data.prepare import is_prepared, prepare_dataset

    data_dir = cfg.data.data_dir
    if data_dir and is_prepared(data_dir):
        return data_dir
    target = os.path.join(output_dir, "data")
    prep = dataclasses.replace(cfg.prepare, data_dir=data_dir, output_dir=target, seed=cfg.seed)
    if not data_dir and not prep.download and not prep.synthetic:
        prep = dataclasses.replace(prep, synthetic=DEFAULT_SYNTHETIC_RATINGS)
        print(f"no --data-dir given: training on a synthetic ml-1m-shaped set of {prep.synthetic:,} ratings "
              f"(pass --data-dir DIR or --download ml-1m for real MovieLens)", flush=True)
    os.makedirs(output_dir, exist_ok=True)
    with FileLock(os.path.join(output_dir, ".prepare.lock")):
        prepare_dataset(prep, target)
    return target


def resolve_resume(resume: Optional[str], checkpoint_dir: str) -> Optional[str]:
    """The checkpoint to resume: `resume` itself, or with 'auto' the newest intact one under
    `checkpoint_dir` (incomplete, damaged or unsafe ones are passed over, each with a printed line
    saying why: `newest_intact_checkpoint`), or None."""
    if not resume:
        return None
    if resume != "auto":
        return resume
    found = latest_checkpoint(checkpoint_dir)
    if found is None:
        print(f"--resume auto: no checkpoint in {checkpoint_dir}; starting from scratch", flush=True)
    return found


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """The newest intact checkpoint under `checkpoint_dir` (by global step), or None."""
    found = newest_intact_checkpoint(checkpoint_dir, report=lambda line: print(line, flush=True))
    return str(found) if found is not None else None


def launch_rank(cfg: TrainConfig) -> int:
    """This process's global rank as the launcher announced it (torchrun/SageMaker set RANK;
    Lightning's own launcher sets NODE_RANK and LOCAL_RANK), known before any process group exists."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) * cfg.distributed.devices + int(os.environ.get("LOCAL_RANK", 0))


def close_process_group() -> None:
    """Destroy the job's process group, and with it join its communication threads, while the
    interpreter still runs (after a successful job; a failing one exits through Lightning's error
    handling).

    Lightning leaves the group to the interpreter's exit. Gloo's worker threads then free the last
    collectives' work objects while Python finalises, and a work object launched during a backward
    pass holds Python state that autograd stashes in the thread's state: freeing it takes the GIL,
    which a finalising interpreter does not give back, and the thread's exit aborts the process
    (SIGABRT) after the job has finished; torchrun then reports it as failed. The trainer, strategy
    and model, which hold the group, are garbage once `_run` has returned: collecting their
    reference cycles first leaves the group without references, so destroying it joins its threads."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()
