"""The LightningModule: what is trained (towers, loss, optimizers, metrics), not how it is distributed.

How a training step runs is the step runner's (`twotower_lit.training.steps`), chosen by the run
plan; which parameters are sharded, replicated or dense the strategy says after sharding, through
`twotower_lit.sharded.ShardedParts`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from twotower_lit import patches
from twotower_lit.config import ModelConfig, OptimConfig
from twotower_lit.data.batches import Batch
from twotower_lit.layers import logits
from twotower_lit.losses import TwoTowerLoss
from twotower_lit.model import FeatureSpec, TwoTower
from twotower_lit.optim import EMBEDDING_OPTIMIZERS, build_optimizer
from twotower_lit.sharded import ShardedParts
from twotower_lit.training.steps import EagerSteps, StepRunner

MODEL_KEY = "twotower_model"  # in a checkpoint: the model options and embedding tables it was trained with


def _binary_metrics() -> torchmetrics.MetricCollection:
    return torchmetrics.MetricCollection({
        "auc": torchmetrics.classification.BinaryAUROC(),
        "accuracy": torchmetrics.classification.BinaryAccuracy(),
        "logloss": torchmetrics.MeanMetric(),
    })


class TwoTowerModule(L.LightningModule):
    """Two-tower model scored by dot product, trained with a `twotower_lit.losses.TwoTowerLoss`
    (default: plain BCE; the training job passes the configured one) under `TorchRecStrategy`.

    Training steps are taken by `steps` (default: one eager step per call), given the call's batch,
    or Lightning's batch iterator when it takes several per call. Metrics on validation/test: AUC,
    log-loss and accuracy over rated rows (torchmetrics syncs them across ranks); retrieval metrics
    come from `twotower_lit.evaluation.RetrievalEvaluation`.
    """

    def __init__(self, features: Sequence[FeatureSpec], model_cfg: ModelConfig, optim_cfg: OptimConfig,
                 total_steps: int = 0, loss: Optional[TwoTowerLoss] = None,
                 steps: Optional[StepRunner] = None) -> None:
        super().__init__()
        self.features = list(features)
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.steps = steps or EagerSteps()
        if self.steps.steps_per_execution > 1:
            # Lightning hands training_step its batch iterator when the step's signature asks for it
            self.training_step = self._training_steps
        # tables on meta: the strategy's DMP materialises only the shards this rank owns
        self.model = TwoTower(features, model_cfg.embedding_dim, model_cfg.user_layers, model_cfg.item_layers,
                              device=torch.device("meta"), exposure_dims=model_cfg.exposure_dims)
        cls, extra = EMBEDDING_OPTIMIZERS[optim_cfg.embedding_optimizer]
        apply_optimizer_in_backward(cls, self.model.ebc.parameters(), {"lr": optim_cfg.embedding_lr, **extra})
        self.loss_fn = loss or TwoTowerLoss("bce", num_items=next(f.num_embeddings for f in features
                                                                    if f.name == "item"))
        self.parts: Optional[ShardedParts] = None
        self.val_metrics = _binary_metrics()
        self.test_metrics = _binary_metrics()
        self._loss_total: Optional[torch.Tensor] = None  # training loss summed since the last logged step
        self._loss_steps = 0
        # Manual optimisation: the step runner runs zero_grad, backward and the optimizer step.
        # Lightning's automatic optimisation wraps each step in a closure through the strategy, the
        # precision plugin and the optimizer: host work on every step of a host-bound GPU step.
        self.automatic_optimization = False

    # ----------------------------------------------------------------- the strategy's contract
    def on_sharded(self, parts: ShardedParts) -> None:
        self.parts = parts

    def check_resumable(self, checkpoint: Mapping[str, Any], path: str) -> None:
        """Refuse a checkpoint of another model, naming what differs, before its weights are
        loaded: another width fails deep inside the load, and another ``--exposure-dims`` (same
        shapes) would silently change what the trained dimensions mean."""
        saved = checkpoint.get(MODEL_KEY)
        if saved is None:
            return
        now = self.model_description()

        def shown(value: Any) -> str:
            return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).lower()

        differences = [f"--{name.replace('_', '-')} {shown(saved['options'][name])} there, {shown(value)} here"
                       for name, value in now["options"].items()
                       if name in saved["options"] and saved["options"][name] != value]
        if saved["options"].get("exposure_dims") != now["options"]["exposure_dims"]:
            differences.append("(--exposure-dims counts only with --loss both; other losses train with 0)")
        if saved["tables"] != now["tables"]:
            differences.append(f"embedding tables (feature: rows) {saved['tables']} there, {now['tables']} here "
                               f"(another dataset or --side-features)")
        if differences:
            raise ValueError(f"{path} holds another model than this run builds: {'; '.join(differences)}. Resume "
                             f"with the checkpoint's model options and data, or start a new run in another "
                             f"--output-dir (or --checkpoint-dir)")

    def configure_optimizers(self) -> Dict[str, Any]:
        if self.parts is None:
            raise RuntimeError("TwoTowerModule trains under twotower_lit.distributed.TorchRecStrategy, which "
                               "shards its model and hands it the parameters (on_sharded) first")
        optimizer, schedule = build_optimizer(self.parts, self.optim_cfg, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------- training
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Asynchronous copies from the loader's pinned memory (Lightning's default passes
        ``non_blocking`` only to plain tensors; a blocking copy would stall the host on every step
        until the GPU has finished the previous one)."""
        if isinstance(batch, Batch):
            return batch.to(device, non_blocking=device.type == "cuda")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def forward(self, batch: Batch) -> torch.Tensor:
        user, item = self.model(batch.features)
        return logits(user, item, self.model_cfg.exposure_dims)

    def loss_of(self, user: torch.Tensor, item: torch.Tensor, items: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """The training loss of tower outputs (what a graphed step captures)."""
        return self.loss_fn(user, item, items, labels)[0]

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """The training loss of a device batch."""
        user, item = self.model(batch.features)
        return self.loss_of(user, item, batch.features["item"].values(), batch.labels)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """One step per call: Lightning moved the batch, and callbacks see it."""
        losses = self.steps.run_batch(self, batch)
        self._log_train_loss(losses)
        return losses[-1]

    def _training_steps(self, dataloader_iter) -> torch.Tensor:  # (the parameter's name tells Lightning)
        """Several steps per call: the runner takes them from Lightning's batch iterator."""
        losses = self.steps.run(self, dataloader_iter)
        self._log_train_loss(losses)
        return losses[-1]

    def _log_train_loss(self, losses: List[torch.Tensor]) -> None:
        """Log ``train_loss``, the mean loss of this rank's steps since the last logged one, on the
        steps Lightning writes logs, as a CPU tensor. Not ``self.log(loss)`` on every step: that
        turns each value into a Python number, which on a GPU blocks the host until the step has
        finished, so the host never runs ahead to launch the next one."""
        for loss in losses:
            loss = loss.detach()
            self._loss_total = loss if self._loss_total is None else self._loss_total + loss
            self._loss_steps += 1
        if not patches.should_update_logs(self.trainer):
            return
        mean = (self._loss_total / self._loss_steps).float().cpu()
        self._loss_total, self._loss_steps = None, 0
        self.log("train_loss", mean, prog_bar=True, batch_size=1, sync_dist=False)

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Batch, metrics: torchmetrics.MetricCollection) -> None:
        z = self(batch)
        keep = batch.rated
        z, y = z[keep], batch.labels[keep]
        probs = torch.sigmoid(z)
        metrics["auc"].update(probs, y.long())
        metrics["accuracy"].update(probs, y.long())
        if len(y):
            metrics["logloss"].update(F.binary_cross_entropy_with_logits(z, y, reduction="none"))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: torchmetrics.MetricCollection) -> None:
        values = metrics.compute()  # synchronised across ranks by torchmetrics
        self.log_dict({f"{stage}_{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=False)
        metrics.reset()

    @torch.no_grad()
    def tower_vectors_from_features(self, features) -> Tuple[torch.Tensor, torch.Tensor]:
        """(user vectors, item vectors) of a feature batch (retrieval evaluation)."""
        return self.model(features)

    # ----------------------------------------------------------------- checkpoints
    def model_description(self) -> Dict[str, Any]:
        """What a checkpoint's weights mean: the model options and each table's rows."""
        return {"options": dataclasses.asdict(self.model_cfg),
                "tables": {f.name: f.num_embeddings for f in self.features}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[MODEL_KEY] = self.model_description()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Make Lightning's loop state resumable, and keep ``global_step`` across optimisation modes."""
        patches.finish_epoch_of_epoch_end_checkpoint(checkpoint)
        patches.carry_optimizer_steps(checkpoint, self.automatic_optimization)
