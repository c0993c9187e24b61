"""Step runners: how the module's training steps run, chosen by the run plan.

A runner trains on the batches of one Lightning ``training_step`` call (with several per call,
taken from Lightning's iterator): `EagerSteps(1)` one eager step per call; `EagerSteps(K)` several per call (Keras'
``steps_per_execution``: Lightning's per-batch loop, a fixed share of a host-bound GPU step, runs
once per K steps); `GraphedSteps(K)` the same with each step captured once as a CUDA graph and
replayed (`twotower_lit.graphs`). All three train on the same batches in the same order with the
same result, and count batches and steps as Lightning would with one batch per call, so a
checkpoint resumes under any of them.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Protocol

import torch

from twotower_lit import patches
from twotower_lit.data.batches import Batch
from twotower_lit.graphs import GraphedTrainingStep
from twotower_lit.model import FeatureSpec


class StepRunner(Protocol):
    steps_per_execution: int

    def run(self, module: Any, batches: Iterator) -> List[torch.Tensor]:
        """Train on the batches of one call taken from Lightning's iterator; returns each step's loss."""

    def run_batch(self, module: Any, batch: Batch) -> List[torch.Tensor]:
        """Train on the one batch of a call (on the device already)."""

    def report(self) -> Optional[Dict[str, Any]]:
        """How the steps ran (for metrics.json), or None."""


class EagerSteps:
    """`steps_per_execution` eager steps per call. A call ends on the next multiple of K optimizer
    steps, or earlier on a multiple of `checkpoint_every_n_steps` or at the epoch's end, so that
    step-interval checkpoints are written where they are with K = 1. The steps after a call's first
    skip Lightning's per-step wrappers when nothing would observe it (`patches.lean_steps_allowed`)."""

    def __init__(self, steps_per_execution: int = 1, checkpoint_every_n_steps: int = 0) -> None:
        if steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be at least 1, got {steps_per_execution}")
        self.steps_per_execution = steps_per_execution
        self.checkpoint_every_n_steps = checkpoint_every_n_steps

    def steps_this_call(self, global_step: int) -> int:
        """Steps from `global_step` to the next multiple of K or of the checkpoint interval."""
        steps = self.steps_per_execution - global_step % self.steps_per_execution
        if self.checkpoint_every_n_steps > 0:
            steps = min(steps, self.checkpoint_every_n_steps - global_step % self.checkpoint_every_n_steps)
        return steps

    def run(self, module: Any, batches: Iterator) -> List[torch.Tensor]:
        trainer = module.trainer
        optimizer, schedule = module.optimizers(), module.lr_schedulers()
        device = trainer.strategy.root_device
        lean = self.steps_per_execution > 1 and patches.lean_steps_allowed(trainer, module)
        losses: List[torch.Tensor] = []
        for _ in range(self.steps_this_call(trainer.global_step)):
            try:
                batch, _, _ = next(batches)  # raises StopIteration after the epoch's last batch
            except StopIteration:
                if not losses:
                    raise
                break
            # with the iterator, moving the batch is the module's job (a no-op for batches built on the device)
            batch = module.transfer_batch_to_device(batch, device, 0)
            losses.append(self.step(module, batch, optimizer, schedule, lean, first=not losses))
        # Lightning counted this call as one batch: count the others too (before the module's
        # logging decision, which reads the logging step)
        patches.count_extra_batches(trainer, len(losses) - 1, is_last_batch=batches.done)
        return losses

    def run_batch(self, module: Any, batch: Batch) -> List[torch.Tensor]:
        return [self.step(module, batch, module.optimizers(), module.lr_schedulers(), lean=False, first=True)]

    def step(self, module: Any, batch: Batch, optimizer, schedule, lean: bool, first: bool) -> torch.Tensor:
        """One eager step: loss, backward, optimizer and schedule step. `optimizer` is Lightning's
        wrapper, whose step() counts ``global_step``; `lean` (not on a call's first step) calls
        backward and the optimizer directly.

        Gradients are zeroed before the forward pass: TorchRec's fused embedding optimizers write
        the learning rate into a tensor in ``zero_grad()``, which a forward pass under
        ``torch.compile`` saves for its backward pass, which then refuses to run if it was written
        in between."""
        optimizer.zero_grad()
        loss = module.batch_loss(batch)
        if lean and not first:
            loss.backward()
            patches.lean_optimizer_step(optimizer)
        else:
            module.manual_backward(loss)
            optimizer.step()
        schedule.step()
        return loss.detach()

    def report(self) -> Optional[Dict[str, Any]]:
        return None


class GraphedSteps(EagerSteps):
    """`EagerSteps` whose steps are one `GraphedTrainingStep` (captured as a CUDA graph on a GPU,
    eager on a CPU, where the padding is tested). A batch whose shape the graph cannot take (an
    epoch's shorter last batch) steps eagerly, the same training, and is counted. Only where lean
    steps are allowed: the graph replays the whole step, so nothing could run between its backward
    pass and its optimizer step; otherwise every step is eager and the report says why."""

    def __init__(self, steps_per_execution: int = 1, checkpoint_every_n_steps: int = 0,
                 multi_valued: Optional[FeatureSpec] = None) -> None:
        super().__init__(steps_per_execution, checkpoint_every_n_steps)
        self.multi_valued = multi_valued  # the feature with several values per row (padded in the graph)
        self.refused: Optional[str] = None  # why this run's steps ran eagerly after all
        self.graphed: Optional[GraphedTrainingStep] = None
        self.earlier_eager_steps = 0  # eager steps of a graphed step replaced before its capture
        self.other_shapes = 0  # steps that ran eagerly because their batch did not fit the graph's shapes
        self.first_other_shape: Optional[str] = None

    def step(self, module: Any, batch: Batch, optimizer, schedule, lean: bool, first: bool) -> torch.Tensor:
        if self.graphed is None and self.refused is None and not patches.lean_steps_allowed(module.trainer, module):
            self.refused = ("the trainer observes the step between its backward pass and its optimizer step (a "
                            "precision plugin, profiler or step hook), which a replayed graph would skip")
        if self.refused is not None:
            return super().step(module, batch, optimizer, schedule, lean, first)
        step = self.graphed
        same_fit = step is not None and step.optimizer is optimizer.optimizer  # (a new fit: new optimizers)
        # a new graphed step: the first batch of a fit; or, before the capture, a batch with more
        # rows than the one the input was shaped on (a run resumed just before an epoch's shorter
        # last batch would otherwise capture that shape)
        if not same_fit or (step.graph is None and len(batch.labels) > step.input.rows):
            if same_fit:
                self.earlier_eager_steps += step.eager_steps
            multi = self.multi_valued
            padding = module.parts.zero_rows([multi.table]) if multi is not None else []
            step = self.graphed = GraphedTrainingStep(module.model, module.loss_of, optimizer.optimizer, batch,
                                                      multi.name if multi is not None else None, padding,
                                                      capture=batch.labels.is_cuda)
        reason = step.why_not(batch)
        if reason is not None:  # (an epoch's shorter last batch: the same training, eagerly)
            self.other_shapes += 1
            self.first_other_shape = self.first_other_shape or reason
            return super().step(module, batch, optimizer, schedule, lean=False, first=True)
        loss = patches.lean_optimizer_step(optimizer, lambda: step(batch))
        schedule.step()
        return loss

    def report(self) -> Optional[Dict[str, Any]]:
        if self.refused is not None:
            return {"captured": False, "refused": self.refused}
        if self.graphed is None:
            return None
        report = self.graphed.report()
        report["eager_steps"] += self.earlier_eager_steps
        return {**report, "captured": self.graphed.graph is not None, "other_shapes": self.other_shapes,
                "first_other_shape": self.first_other_shape}
