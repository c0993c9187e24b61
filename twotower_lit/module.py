"""The LightningModule: what is trained (model, loss, optimizers, metrics), not how it is distributed."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from twotower_lit.config import ModelConfig, OptimConfig
from twotower_lit.data.batches import Batch
from twotower_lit.graphs import GraphedTrainingStep, padding_rows, plan_refusal
from twotower_lit.layers import logits
from twotower_lit.losses import TwoTowerLoss
from twotower_lit.model import FeatureSpec, TwoTower
from twotower_lit.optim import GroupedRowWiseAdagrad

EMBEDDING_OPTIMIZERS = {
    "rowwise_adagrad": (RowWiseAdagrad, {}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {}),
}
# the same update for data_parallel tables, which are stepped after the backward pass (one step for all tables)
REPLICATED_TABLE_OPTIMIZERS = {"rowwise_adagrad": GroupedRowWiseAdagrad}
# FBGEMM's CPU kernels fuse only these into the backward pass; Adam on the tables needs CUDA
CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "sgd")
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
# hooks Lightning calls around each backward pass and optimizer step (see `MultiStepTwoTowerModule.lean_steps_allowed`)
_MODULE_STEP_HOOKS = ("on_before_backward", "backward", "on_after_backward", "on_before_optimizer_step")
_CALLBACK_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
_STRATEGY_STEP_HOOKS = ("pre_backward", "backward", "post_backward", "optimizer_step")
MODEL_KEY = "twotower_model"  # in a checkpoint: the model options and embedding tables it was trained with


def check_embedding_optimizer(name: str, device_type: str) -> None:
    """Fail before training starts, naming the option, when the device cannot run the optimizer."""
    if name not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"--embedding-optimizer {name!r}: choose one of {', '.join(EMBEDDING_OPTIMIZERS)}")
    if device_type == "cpu" and name not in CPU_EMBEDDING_OPTIMIZERS:
        raise ValueError(f"--embedding-optimizer {name} runs only on GPUs (FBGEMM's CPU kernels fuse "
                         f"{' and '.join(CPU_EMBEDDING_OPTIMIZERS)}); use --embedding-optimizer rowwise_adagrad "
                         f"on CPU, or --accelerator gpu")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at a step (warm-up, then constant/cosine/linear decay)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        raise ValueError(f"unknown lr_schedule {schedule!r}")

    return factor


def _binary_metrics() -> torchmetrics.MetricCollection:
    return torchmetrics.MetricCollection({
        "auc": torchmetrics.classification.BinaryAUROC(),
        "accuracy": torchmetrics.classification.BinaryAccuracy(),
        "logloss": torchmetrics.MeanMetric(),
    })


class OneClosureCombinedOptimizer(CombinedOptimizer):
    """TorchRec's `CombinedOptimizer` whose ``step(closure)`` evaluates the closure once.

    The stock one hands the closure to every optimizer it combines; the fused embedding
    optimizers ignore it and the towers' optimizer runs it. With one more optimizer that evaluates
    closures (the data_parallel tables') the closure would run twice per step: under Lightning's
    automatic optimisation it runs the training step's forward and backward (twice, each optimizer
    stepping on other gradients); under manual optimisation, as here, Lightning's before-step
    hooks."""

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for _, opt in self.optimizers:
            opt.step()
        return loss


def finish_epoch_of_epoch_end_checkpoint(checkpoint: Dict[str, Any]) -> None:
    """Mark the epoch of a checkpoint written at the end of its training epoch as finished.

    The end-of-epoch checkpoint is written in ``on_train_epoch_end``, before Lightning counts the
    epoch as completed: its loop state is "epoch N started, every batch done". Resumed as it is,
    Lightning 2.6 ends epoch N without a step and, still marked as restarting, finds epoch N+1's
    batch count already reached too, so the run stops without training any remaining epoch. The
    state is rewritten to the one the next epoch starts from: epoch N completed, no batch of
    epoch N+1 done yet. So is that of a step checkpoint written after the epoch's last batch
    (before Lightning counts that batch complete), which Lightning would resume into epoch N+1
    with the data iterator of the finished epoch N, training none of N+1's batches. A mid-epoch
    checkpoint is left as it is."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or not batches.get("is_last_batch"):
        return
    current = batches["current"]
    if epochs["current"]["started"] <= epochs["current"]["completed"] or current["completed"] < current["ready"] - 1:
        return
    if current["completed"] < current["ready"]:  # the step checkpoint of the last batch: count it complete
        batches["total"]["completed"] = batches["total"]["ready"]
        stepped = loop.get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in stepped:
            stepped["_batches_that_stepped"] += 1
    for progress in (epochs["total"], epochs["current"]):
        progress["processed"] = progress["completed"] = progress["started"]
    for key in current:
        current[key] = 0
    batches["is_last_batch"] = False
    checkpoint["epoch"] = epochs["current"]["completed"]


class TwoTowerModule(L.LightningModule):
    """Two-tower model scored by dot product, trained with a `twotower_lit.losses.TwoTowerLoss`
    (default: plain BCE; the training job passes the configured one).

    Metrics on validation/test: AUC, log-loss and accuracy over rated rows (torchmetrics syncs
    them across ranks); retrieval metrics come from `twotower_lit.evaluation.RetrievalEvaluation`.
    """

    def __init__(self, features: Sequence[FeatureSpec], model_cfg: ModelConfig, optim_cfg: OptimConfig,
                 total_steps: int = 0, loss: Optional[TwoTowerLoss] = None) -> None:
        super().__init__()
        self.features = list(features)
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        # tables on meta: the strategy's DMP materialises only the shards this rank owns
        self.model = TwoTower(features, model_cfg.embedding_dim, model_cfg.user_layers, model_cfg.item_layers,
                              device=torch.device("meta"), exposure_dims=model_cfg.exposure_dims)
        cls, extra = EMBEDDING_OPTIMIZERS[optim_cfg.embedding_optimizer]
        apply_optimizer_in_backward(cls, self.model.ebc.parameters(), {"lr": optim_cfg.embedding_lr, **extra})
        # default: plain BCE over every row (the workshop's objective)
        self.loss_fn = loss or TwoTowerLoss("bce", num_items=next(f.num_embeddings for f in features
                                                                    if f.name == "item"))
        self.val_metrics = _binary_metrics()
        self.test_metrics = _binary_metrics()
        self._loss_total: Optional[torch.Tensor] = None  # training loss summed since the last logged step
        self._loss_steps = 0
        # Manual optimisation: `training_step` runs zero_grad, backward and the optimizer step
        # itself. Lightning's automatic optimisation wraps each step in a closure passed through
        # the strategy, the precision plugin and the optimizer, with its zero_grad/backward hooks
        # around it: host work on every step of a host-bound step. On one H200 (ML-32M shape,
        # 65,536 rows, benchmarks/train_throughput.py, three interleaved pairs) the Lightning path
        # ran 11-16% faster this way (12.56 against 11.19 M samples/s on average).
        self.automatic_optimization = False

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

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.optimizer_step_on(batch, self.optimizers(), self.lr_schedulers())
        self._log_train_loss(loss)
        return loss

    def optimizer_step_on(self, batch: Batch, optimizer, schedule, lean: bool = False) -> torch.Tensor:
        """One training step on a device batch: loss, backward, optimizer and schedule step.
        `optimizer` is Lightning's wrapper (``self.optimizers()``): its step() counts global_step.

        Gradients are zeroed before the forward pass: TorchRec's fused embedding optimizers write
        the learning rate into a tensor in ``zero_grad()``, and a forward pass under
        ``torch.compile`` saves that tensor for its backward pass, which then refuses to run if
        it was written in between (`benchmarks/GPU_RESULTS.md`).

        `lean` (only where `MultiStepTwoTowerModule.lean_steps_allowed`): without Lightning's
        per-step wrappers, backward and the optimizer step called directly and the step counted
        as Lightning's manual loop counts it (`_on_before_step`/`_on_after_step` are what the
        wrapper's ``step`` calls around the optimizer's). Why: ``manual_backward`` and
        ``LightningOptimizer.step`` go through the strategy, the precision plugin and every
        callback's hooks: skipping them took the training job's step from 2,458 to 1,987 Python
        calls (cProfile, one CPU process, 64-row batches; a hand-written DMP step makes 1,500), on a
        GPU step whose host time bounds it."""
        optimizer.zero_grad()
        loss, _ = self.loss_and_output(batch)
        if lean:
            loss.backward()
            optimizer._on_before_step()
            optimizer.optimizer.step()
            optimizer._on_after_step()
        else:
            self.manual_backward(loss)
            optimizer.step()
        schedule.step()
        return loss

    def _log_train_loss(self, *losses: torch.Tensor) -> None:
        """Log ``train_loss``, the mean loss of this rank's steps since the last logged one, on the
        steps Lightning writes logs (every ``log_every_n_steps``), as a CPU tensor.

        Not ``self.log(loss)`` on every step: Lightning turns each logged progress-bar tensor into
        a Python number after every step, and ``.item()`` on a GPU tensor blocks the host until
        the GPU has finished the step, so the host never runs ahead to launch the next one
        (benchmarks/train_throughput.py measures it: the ``lightning`` mode against ``eager``).
        Here the host waits once per logging interval, and the value is a mean over the interval
        instead of one batch's noise.
        """
        for loss in losses:
            loss = loss.detach()
            self._loss_total = loss if self._loss_total is None else self._loss_total + loss
            self._loss_steps += 1
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        mean = (self._loss_total / self._loss_steps).float().cpu()
        self._loss_total, self._loss_steps = None, 0
        self.log("train_loss", mean, prog_bar=True, batch_size=1, sync_dist=False)

    def loss_and_output(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(training loss, its detached value) of a device batch: what a TorchRec train pipeline calls."""
        user, item = self.model(batch.features)
        loss, _ = self.loss_fn(user, item, batch.features["item"].values(), batch.labels)
        return loss, loss.detach()

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

    def model_description(self) -> Dict[str, Any]:
        """What a checkpoint's weights mean: the model options and each table's rows."""
        return {"options": dataclasses.asdict(self.model_cfg),
                "tables": {f.name: f.num_embeddings for f in self.features}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[MODEL_KEY] = self.model_description()

    def check_resumable(self, checkpoint: Mapping[str, Any], path: str) -> None:
        """Refuse a checkpoint of another model, naming what differs, before its weights are
        loaded: another width fails deep inside the load, and another ``--exposure-dims`` (same
        shapes) would silently change what the trained dimensions mean. Checkpoints written before
        the model was recorded are not checked."""
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

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Make Lightning's loop state resumable (see `finish_epoch_of_epoch_end_checkpoint`), then
        carry the optimizer-step count across optimisation modes: Lightning counts steps in a
        different loop state for automatic and manual optimisation, so a checkpoint written with
        one (automatic: this module before it optimised manually, or a subclass that turns it
        back on) resumed with the other would restart ``global_step``."""
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        finish_epoch_of_epoch_end_checkpoint(checkpoint)
        auto_key = "epoch_loop.automatic_optimization.optim_progress"
        manual_key = "epoch_loop.manual_optimization.optim_step_progress"
        if auto_key not in loop or manual_key not in loop:
            return
        steps = loop[auto_key]["optimizer"]["step"]
        if self.automatic_optimization and loop[manual_key]["total"]["completed"] > steps["total"]["completed"]:
            loop[auto_key]["optimizer"]["step"] = loop[manual_key]
        elif not self.automatic_optimization and steps["total"]["completed"] > loop[manual_key]["total"]["completed"]:
            loop[manual_key] = steps

    @torch.no_grad()
    def tower_vectors_from_features(self, features):
        """(user vectors, item vectors) of a feature batch (retrieval evaluation)."""
        return self.model(features)

    def configure_optimizers(self) -> Dict[str, Any]:
        cfg = self.optim_cfg
        dense_cls = DENSE_OPTIMIZERS[cfg.dense_optimizer]
        dense_params = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        # Tables sharded data_parallel are plain replicated parameters (DDP averages their
        # gradients), not fused into the backward pass: they keep the embedding optimizer and its
        # learning rate in an optimizer of their own instead of joining the towers' one.
        replicated = {k: p for k, p in dense_params.items() if "embedding_bags." in k}
        dense_params = {k: p for k, p in dense_params.items() if k not in replicated}
        # on GPUs Adam's update is one fused kernel instead of several per parameter (a host-bound step)
        one_kernel = {"fused": True} if cfg.dense_optimizer in ("adam", "adamw") and all(
            p.is_cuda for p in dense_params.values()) else {}
        dense = KeyedOptimizerWrapper(
            dense_params,
            lambda params: dense_cls(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay, **one_kernel))
        parts: List = [("dense", dense)]
        if replicated:
            cls, extra = EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer]
            cls = REPLICATED_TABLE_OPTIMIZERS.get(cfg.embedding_optimizer, cls)
            parts.append(("replicated_tables", KeyedOptimizerWrapper(
                replicated, lambda params: cls(params, lr=cfg.embedding_lr, **extra))))
        fused = getattr(self.model, "fused_optimizer", None)  # the embedding optimizer run in backward
        if fused is not None:
            parts.insert(0, ("embedding", fused))
        optimizer = OneClosureCombinedOptimizer(parts)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class PipelinedTwoTowerModule(TwoTowerModule):
    """`TwoTowerModule` trained through TorchRec's train pipeline (``--train-pipeline sparse_dist``).

    The strategy's `pipelined_training_step` runs each step: while batch i computes, batch i+1's
    embedding input distribution and batch i+2's host-to-device copy are already under way. The
    pipeline calls the optimizer itself, and the learning-rate schedule is stepped here, once per
    optimizer step. Evaluation, checkpoints and export are unchanged.
    """

    def training_step(self, dataloader_iter) -> torch.Tensor:  # Lightning passes the iterator (name matters)
        losses = self.trainer.strategy.pipelined_training_step(dataloader_iter, self.loss_and_output)
        schedule = self.lr_schedulers()
        for _ in losses:
            schedule.step()
        self._log_train_loss(*losses)
        return losses[-1]


class MultiStepTwoTowerModule(TwoTowerModule):
    """`TwoTowerModule` running several optimizer steps per Lightning ``training_step`` call
    (``--steps-per-execution K``, Keras' ``steps_per_execution``).

    On a GPU the step is bound by the host's per-step work, and Lightning's per-batch loop (its
    module, callback and strategy hooks, progress and logging bookkeeping) is a fixed share of it;
    here it runs once per K steps. Each step is `TwoTowerModule.optimizer_step_on`, the step of
    `TwoTowerModule.training_step`, on the same batches in the same order. Lightning's batch
    counters and logging step are advanced by the extra batches, so that everything counted in
    batches or steps (the checkpointed position in the epoch, the logged steps, ``global_step``)
    means what it means with K = 1: a checkpoint resumes with any K. Each call ends on the next
    multiple of K optimizer steps, or earlier on a multiple of `checkpoint_every_n_steps` or at the
    epoch's end: step-interval checkpoints are written where they are with K = 1, and logging
    intervals that are multiples of K fall on call boundaries.

    The steps after a call's first skip Lightning's per-step wrappers (`optimizer_step_on`'s
    ``lean``) when nothing would observe it (`lean_steps_allowed`).
    """

    def __init__(self, *args: Any, steps_per_execution: int = 1, checkpoint_every_n_steps: int = 0,
                 graphed_steps: bool = False, graphs_required: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be at least 1, got {steps_per_execution}")
        self.steps_per_execution = steps_per_execution
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        # --cuda-graphs: steps on fixed-shape input, replayed as one CUDA graph on a GPU (`twotower_lit.graphs`)
        # (``graphs_required``, --cuda-graphs on: a run whose sharding plan cannot be captured fails)
        self.graphed_steps, self.graphs_required = graphed_steps, graphs_required
        self.graph_refusal: Optional[str] = None  # why the steps were not captured after all (`plan_refusal`)
        self._graphed: Optional[GraphedTrainingStep] = None
        self._earlier_eager_steps = 0  # eager steps of a step replaced before its capture (see graphed_step_on)
        self.graph_skips = 0  # steps that ran eagerly because their batch did not fit the graph's shapes
        self.graph_skip_reason: Optional[str] = None

    def steps_this_call(self, global_step: int) -> int:
        """Steps from `global_step` to the next multiple of K or of the checkpoint interval."""
        steps = self.steps_per_execution - global_step % self.steps_per_execution
        if self.checkpoint_every_n_steps > 0:
            steps = min(steps, self.checkpoint_every_n_steps - global_step % self.checkpoint_every_n_steps)
        return steps

    def training_step(self, dataloader_iter) -> torch.Tensor:  # Lightning passes the iterator (name matters)
        trainer = self.trainer
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        device = trainer.strategy.root_device
        lean = self.lean_steps_allowed()
        graphed = self.graphed_steps and lean
        losses: List[torch.Tensor] = []
        for _ in range(self.steps_this_call(trainer.global_step)):
            try:
                batch, _, _ = next(dataloader_iter)  # raises StopIteration after the epoch's last batch
            except StopIteration:
                if not losses:
                    raise
                break
            # with the iterator, moving the batch is the module's job (a no-op for --data-on-device batches)
            batch = self.transfer_batch_to_device(batch, device, 0)
            loss = self.graphed_step_on(batch, optimizer, schedule) if graphed else None
            if loss is None:
                loss = self.optimizer_step_on(batch, optimizer, schedule, lean=lean and bool(losses))
            losses.append(loss)
        # Lightning counted this call as one batch: count the others too (before the logging
        # decision in `_log_train_loss`, which reads the logging step)
        loop = trainer.fit_loop.epoch_loop
        loop.batch_progress.increment_by(len(losses) - 1, is_last_batch=dataloader_iter.done)
        loop._batches_that_stepped += len(losses) - 1
        self._log_train_loss(*losses)
        return losses[-1]

    def graphed_step_on(self, batch: Batch, optimizer, schedule) -> Optional[torch.Tensor]:
        """`optimizer_step_on`'s lean step as a `GraphedTrainingStep` (captured as a CUDA graph on a
        GPU), or None when the batch does not fit its shapes (a shorter last batch): then the
        caller takes the eager step. Only where lean steps are allowed: the graph replays the whole
        step, so nothing could run between its backward pass and its optimizer step."""
        step = self._graphed
        same_fit = step is not None and step.optimizer is optimizer.optimizer  # (a new fit: new optimizers)
        # a new step: the first batch of a fit; or, before the capture, a batch with more rows than
        # the one the input was shaped on (a run resumed just before an epoch's shorter last batch
        # would otherwise capture that shape)
        if not same_fit or (step.graph is None and len(batch.labels) > step.input.rows):
            if step is None:
                # the plan is known once the strategy has sharded the model
                self.graph_refusal = plan_refusal(self.trainer.world_size,
                                                  getattr(self.trainer.strategy, "plan_description", {}))
                if self.graph_refusal is not None:
                    if self.graphs_required:
                        raise ValueError(f"--cuda-graphs on: {self.graph_refusal}; or pass --cuda-graphs off")
                    self.graphed_steps = False  # (auto) this run steps eagerly
                    return None
            if same_fit:
                self._earlier_eager_steps += step.eager_steps
            multi = [f for f in self.features if f.pooling == "mean"]

            def loss_fn(user, item, items, labels):
                return self.loss_fn(user, item, items, labels)[0]

            step = self._graphed = GraphedTrainingStep(
                self.model, loss_fn, optimizer.optimizer, batch, multi[0].name if multi else None,
                padding_rows(self.model, [f.table for f in multi]), capture=batch.labels.is_cuda)
        reason = step.why_not(batch)
        if reason is not None:
            self.graph_skips += 1
            self.graph_skip_reason = self.graph_skip_reason or reason
            return None
        optimizer._on_before_step()
        loss = step(batch)
        optimizer._on_after_step()
        schedule.step()
        return loss

    def graph_report(self) -> Optional[Dict[str, Any]]:
        """How the training steps ran with graphed steps on (None when off or not started)."""
        if self.graph_refusal is not None:
            return {"captured": False, "refused": self.graph_refusal}
        if self._graphed is None:
            return None
        report = self._graphed.report()
        report["eager_steps"] += self._earlier_eager_steps
        return {**report, "captured": self._graphed.graph is not None,
                "other_shapes": self.graph_skips, "first_other_shape": self.graph_skip_reason}

    def lean_steps_allowed(self) -> bool:
        """Whether a lean `optimizer_step_on` does exactly what the full one does in this run: plain
        32-bit precision (no loss scaling or other precision-plugin work); the strategy's backward
        and optimizer-step hooks those of Lightning's `Strategy` or `DDPStrategy`, which do nothing
        here (the LightningModule is not wrapped in DDP: TorchRec's DMP averages gradients itself;
        no model averaging); no profiler; and no callback or module override of the hooks
        Lightning calls around each backward pass and optimizer step."""
        trainer = self.trainer
        strategy = trainer.strategy
        if type(trainer.precision_plugin) is not Precision or not isinstance(trainer.profiler, PassThroughProfiler):
            return False
        if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel) \
                or getattr(strategy, "_model_averager", None) is not None:
            return False
        if any(getattr(type(strategy), hook) not in (getattr(Strategy, hook), getattr(DDPStrategy, hook))
               for hook in _STRATEGY_STEP_HOOKS):
            return False
        if any(getattr(type(self), hook) is not getattr(L.LightningModule, hook) for hook in _MODULE_STEP_HOOKS):
            return False
        return not any(getattr(type(cb), hook) is not getattr(L.Callback, hook)
                       for cb in trainer.callbacks for hook in _CALLBACK_STEP_HOOKS)
