"""Callbacks of the training job: the training-loop clock, and the report of a lost peer."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import List, Optional, Tuple

import lightning as L
import torch


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
