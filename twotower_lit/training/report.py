"""What the training job reports: metrics.json's content, and the summary it prints."""
from __future__ import annotations

import math
import os
from typing import Any, Dict

import lightning as L
import numpy as np
import torch

from twotower_lit import tracking
from twotower_lit.config import TrainConfig
from twotower_lit.data.datamodule import MovieLensDataModule
from twotower_lit.evaluation import RetrievalEvaluation
from twotower_lit.metrics import PopularityBaseline, retrieval_names
from twotower_lit.training.callbacks import BestEpoch, TrainingClock, callback_of
from twotower_lit.training.plan import RunPlan


def collect_metrics(cfg: TrainConfig, plan: RunPlan, trainer: L.Trainer, module: Any, dm: MovieLensDataModule,
                    test: Dict[str, float], fit_seconds: float) -> Dict[str, Any]:
    """metrics.json of a finished run (rank 0): test metrics beside the popularity baseline, how
    training ran, the plan, the sharding plan and the data."""
    k = cfg.tracking.eval_k
    retrieval = callback_of(trainer, RetrievalEvaluation).last.get("test", {})
    clock = callback_of(trainer, TrainingClock)
    row_rate = rows_per_step(dm, trainer.world_size, cfg.data.negatives)
    # the steps this process trained: a resumed run's earlier steps (maybe on another number of
    # processes) took no time here
    rows = round(row_rate * clock.steps)
    return {
        "test": {"auc": test["test_auc"], "logloss": test["test_logloss"], "accuracy": test["test_accuracy"],
                 **{name: retrieval[name] for name in retrieval_names(k)}},
        "baselines": {"popularity": popularity_metrics(dm, "test", k, trainer.strategy.root_device)},
        "train": {"epochs": trainer.current_epoch, "steps": trainer.global_step, "seconds": round(fit_seconds, 2),
                  "world_size": trainer.world_size, "loop_seconds": round(clock.seconds, 2),
                  "data_on_device": dm.data_on_device,
                  # rows through the model (rated + sampled negatives), all ranks, per second of the
                  # training loop; fit_samples_per_s divides by the whole fit instead (validation,
                  # checkpoints and, with several processes, their start-up included)
                  "samples_per_s": round(rows / max(clock.seconds, 1e-9)),
                  # the same per epoch of this run: the first also pays the one-off warm-up
                  "epoch_samples_per_s": [round(row_rate * steps / max(sec, 1e-9)) for sec, steps in clock.epochs],
                  "fit_samples_per_s": round(rows / max(fit_seconds, 1e-9)),
                  "cuda_graphs": module.steps.report(),
                  # the epoch tested and exported (1-based), and every validated epoch's figures
                  **callback_of(trainer, BestEpoch).report()},
        "plan": plan.describe(),
        "sharding_plan": trainer.strategy.plan_description,
        "data": {"dir": dm.data_dir, "dataset": dm.manifest.get("dataset"), "counts": dm.manifest.get("counts")},
    }


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


def print_summary(metrics: Dict, output_dir: str, k: int) -> None:
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
    phases = metrics.get("train", {}).get("phases")
    if phases:
        print(f"\ntime: {sum(phases.values()):.1f} s: " + ", ".join(f"{name} {seconds:.1f}"
                                                              for name, seconds in phases.items()))
    best = best_epoch_line(metrics.get("train", {}))
    if best:
        print("\n" + best)
    names = ("auc", "logloss", "accuracy", *retrieval_names(k))
    width = max(map(len, names)) + 2
    print("\n" + "metric".ljust(width) + "two-tower".rjust(12) + "popularity".rjust(12))
    for n in names:
        print(n.ljust(width) + f"{metrics['test'][n]:12.4f}" + f"{metrics['baselines']['popularity'][n]:12.4f}")
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


def best_epoch_line(train: Dict) -> str:
    """Which epoch was tested and exported, and why, in a line ('' for a run without the record)."""
    if "best_epoch" not in train:
        return ""
    epochs, best = train.get("epochs"), train["best_epoch"]
    stopped = ", stopped early: no better epoch in the last ones (--early-stopping-patience)" \
        if train.get("stopped_early") else ""
    if best is None:
        return f"tested and exported: the last epoch ({epochs}); no epoch had a finite {train['best_metric']}{stopped}"
    if train["best_metric"] == "last":
        return f"tested and exported: the last epoch ({best} of {epochs})"
    auc = next((h.get("val_auc") for h in train.get("val_history", []) if h["epoch"] == best), None)
    guard = f", val AUC {auc:.4f}" if auc is not None else ""
    return (f"tested and exported: epoch {best} of {epochs}, the best by {train['best_metric']} "
            f"({train['best_value']:.4f}{guard}){stopped}")
