"""Warnings and log records that are understood and harmless in this job, silenced by message and
module so that real ones stay visible."""
from __future__ import annotations

import logging
import warnings


def quiet_known_warnings() -> None:
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
                            category=FutureWarning,
                            module=r"torch\.distributed\.(_shard\.sharded_tensor|checkpoint)\..*")
    # a mid-epoch checkpoint resumes its epoch exactly: the data module keeps the epoch's position
    # in the checkpoint and its readers skip what was trained (tests/training/test_resume_rows.py)
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended",
                            module=r"lightning\.pytorch\..*")
    # TorchRec's planner announces a future change of its default storage reservation; the plans
    # here are built with that default on purpose: another reservation could change them
    warnings.filterwarnings("ignore", message=r"HeuristicalStorageReservation is known to cause issues",
                            category=FutureWarning, module=r"torchrec\.distributed\.planner\..*")
    # the step runners take the batches of a call from Lightning's iterator by design
    # (their own batch accounting: twotower_lit.training.steps)
    warnings.filterwarnings("ignore", message=r"You are using the `dataloader_iter` step flavor",
                            module=r"lightning\.pytorch\..*")
    warnings.filterwarnings("ignore", message=r"Found `dataloader_iter` argument in the `training_step`",
                            module=r"lightning\.pytorch\..*")
    for name in ("torchrec.distributed.planner", "torchrec.distributed.comm", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        drop_log_records(name, "try installing [litlogger]")  # an advertisement
    # TorchRec's KeyedJaggedTensor asks torch.fx whether it is being traced on every batch; nothing is traced
    drop_log_records("torch.fx._symbolic_trace", "is_fx_tracing will return true for both")


def drop_log_records(logger: str, text: str) -> None:
    """Drop the records of `logger` whose message contains `text` (once per logger and text)."""
    target = logging.getLogger(logger)
    if any(getattr(f, "dropped_text", None) == text for f in target.filters):
        return

    class Drop(logging.Filter):
        dropped_text = text

        def filter(self, record: logging.LogRecord) -> bool:
            return text not in record.getMessage()

    target.addFilter(Drop())
