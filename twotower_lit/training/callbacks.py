"""Callbacks of the training job: the training-loop clock, the best epoch (and early stopping), and
the report of a lost peer."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch


def callback_of(trainer: L.Trainer, kind: type) -> Any:
    """The trainer's callback of class `kind` (the job's trainer has one of each)."""
    return next(c for c in trainer.callbacks if isinstance(c, kind))


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


class JobPhases(L.Callback):
    """Seconds of each phase of the job on this process, summing to its wall time: the job marks
    the phases it runs one after the other (`lap`); inside the fit, this callback tells the
    start-up (process group, sharding, the sanity check), the training loop (`TrainingClock`'s),
    validation and the rest (epoch-end checkpoints, loop bookkeeping) apart. `process_start`: the
    process's creation (seconds since the epoch), so that the interpreter's start-up counts."""

    def __init__(self, process_start: Optional[float] = None) -> None:
        now = time.time()
        # the interpreter's start-up and imports, from the process's creation when it is known
        imports = max(now - process_start, 0.0) if process_start else 0.0
        self.phases: Dict[str, float] = {"start-up and imports": imports}
        self._last = now
        self._train_start: Optional[float] = None
        self._validation = 0.0
        self._validation_start: Optional[float] = None

    def lap(self, name: str) -> float:
        """Count the time since the last lap as phase `name`; returns it."""
        now = time.time()
        seconds = now - self._last
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self._last = now
        return seconds

    def on_train_start(self, trainer, module) -> None:
        self._train_start = time.time()

    def on_validation_start(self, trainer, module) -> None:
        self._validation_start = time.time()

    def on_validation_end(self, trainer, module) -> None:
        if self._validation_start is not None and not trainer.sanity_checking:
            self._validation += time.time() - self._validation_start
        self._validation_start = None

    def end_fit(self, loop_seconds: float) -> None:
        """After `trainer.fit`: the fit's time split into its parts (`loop_seconds`: `TrainingClock`'s)."""
        fit_start = self._last  # (the job calls fit right after its last lap)
        fit = self.lap("fit")
        del self.phases["fit"]
        start_up = self._train_start - fit_start if self._train_start else 0.0
        parts = {"fit start-up (process group, sharding, sanity check)": start_up,
                 "training loop": loop_seconds, "validation": self._validation}
        parts["checkpoints and epoch ends"] = max(fit - sum(parts.values()), 0.0)
        for name, seconds in parts.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds

    def rounded(self) -> Dict[str, float]:
        return {name: round(seconds, 2) for name, seconds in self.phases.items()}


AT_K = ("recall", "ndcg", "mrr", "hit_rate")  # retrieval metrics, logged as val_<name>_at_<k>


class BestEpoch(L.Callback):
    """The epoch that is tested and exported, chosen from every validated epoch of the run, and
    early stopping.

    After each validation the epoch's ``val_*`` metrics and the path of the checkpoint that ends
    it (`epoch_checkpoint`, which keeps every epoch's) join `history`, which the trainer state
    keeps, so a resumed run chooses among the epochs trained before it too. The best epoch is the
    best by `metric` among the epochs whose validation AUC is within `auc_tolerance` of the best
    validation AUC so far (the earliest of equals): judged on the whole history each time, because
    an epoch picked early may fall out of the guard when AUC rises later, which a monitor of one
    number per epoch (Lightning's ModelCheckpoint / EarlyStopping) cannot express. With
    `patience`, training stops once the best epoch is that many epochs behind.

    Rank 0 also prints ``val:recall@10=0.1234 val:auc=0.7890 epoch=3`` per epoch, the line that a
    SageMaker job's metric definitions read (`twotower_lit.aws.hyperparameters`)."""

    def __init__(self, metric: str, k: int, auc_tolerance: float, patience: int, epoch_checkpoint) -> None:
        if patience < 0:
            raise ValueError(f"--early-stopping-patience {patience}: give a number of epochs >= 1, or 0 for off")
        if patience and metric == "last":
            raise ValueError("--early-stopping-patience needs a --best-metric to judge epochs by, not 'last'")
        self.metric = metric
        self.name = "last" if metric == "last" else f"val_{metric}_at_{k}" if metric in AT_K else f"val_{metric}"
        self.k = k
        self.auc_tolerance = auc_tolerance
        self.patience = patience
        self.epoch_checkpoint = epoch_checkpoint
        self.history: List[Dict[str, Any]] = []
        self.stopped_early = False

    def state_dict(self) -> Dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch, step = trainer.current_epoch, trainer.global_step
        entry: Dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                 # the name the epoch-end checkpoint gets (no version counter: see job)
                                 "path": self.epoch_checkpoint.format_checkpoint_name({"epoch": epoch, "step": step})}
        entry.update({name: float(value) for name, value in trainer.callback_metrics.items()
                      if name.startswith("val_")})
        self.history = [h for h in self.history if h["epoch"] != entry["epoch"]] + [entry]
        if trainer.is_global_zero:
            print(self.line(entry), flush=True)
        if self.patience:
            best = self.best()
            behind = best is not None and entry["epoch"] - best["epoch"] >= self.patience
            # every rank decides alike (the metrics are synchronised); reduced, as Lightning's
            # EarlyStopping does, by a collective every rank enters whatever it decided
            stop = trainer.strategy.reduce_boolean_decision(behind, all=False)
            trainer.should_stop = trainer.should_stop or stop
            self.stopped_early = self.stopped_early or stop

    def line(self, entry: Dict[str, Any]) -> str:
        """The per-epoch line of the job's log (values as Python prints floats: nan stays nan)."""
        return (f"val:recall@{self.k}={entry.get(f'val_recall_at_{self.k}', math.nan):.4f} "
                f"val:auc={entry.get('val_auc', math.nan):.4f} epoch={entry['epoch']}")

    def best(self) -> Optional[Dict[str, Any]]:
        """The history entry of the best epoch so far, or None (no epoch validated, or none with a
        finite value of the metric)."""
        if self.metric == "last":
            return self.history[-1] if self.history else None
        rows = [h for h in self.history if math.isfinite(h.get(self.name, math.nan))]
        aucs = [h["val_auc"] for h in rows if math.isfinite(h.get("val_auc", math.nan))]
        if self.auc_tolerance >= 0 and aucs:
            rows = [h for h in rows if h.get("val_auc", -math.inf) >= max(aucs) - self.auc_tolerance]
        if not rows:
            return None
        sign = -1.0 if self.metric == "logloss" else 1.0
        return max(rows, key=lambda h: (sign * h[self.name], -h["epoch"]))

    def report(self) -> Dict[str, Any]:
        """What metrics.json's ``train`` says of the choice."""
        best = self.best()
        return {"best_epoch": best["epoch"] if best else None, "best_metric": self.name,
                "best_value": best.get(self.name) if best else None, "stopped_early": self.stopped_early,
                "val_history": [{k: v for k, v in h.items() if k != "path"} for h in self.history]}


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
    exception reach `peer_failures_explained`. Meanwhile Lightning's launcher, which polls the
    ranks every 5 s, may SIGKILL this process because the other rank died; printing here makes sure
    the explanation reaches the job's log first."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        message = _peer_lost_message(exception, trainer, self.checkpoint_dir)
        if message:
            print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def peer_failures_explained(trainer: L.Trainer, checkpoint_dir: str):
    """Turn a collective's low-level failure into an error that says what happened and what to do."""
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as e:
        message = _peer_lost_message(e, trainer, checkpoint_dir)
        if message:
            raise PeerLostError(message) from e
        raise
