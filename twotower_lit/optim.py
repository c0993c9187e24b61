"""The job's optimizers: the embedding optimizer (fused into the sharded tables' backward pass, or
stepped after it for replicated tables), the towers' optimizer, and the learning-rate schedule."""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from twotower_lit import patches
from twotower_lit.config import OptimConfig
from twotower_lit.graphs import on_every_replay
from twotower_lit.sharded import ShardedParts

EMBEDDING_OPTIMIZERS = {
    "rowwise_adagrad": (RowWiseAdagrad, {}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {}),
}
# FBGEMM's CPU kernels fuse only these into the backward pass; Adam on the tables needs CUDA
CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "sgd")
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


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


class OneClosureCombinedOptimizer(CombinedOptimizer):
    """TorchRec's `CombinedOptimizer` whose ``step(closure)`` evaluates the closure once.

    The stock one hands the closure to every optimizer it combines: with two optimizers that
    evaluate closures (the towers' and the replicated tables') it would run twice per step."""

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for _, opt in self.optimizers:
            opt.step()
        return loss


def build_optimizer(parts: ShardedParts, cfg: OptimConfig,
                    total_steps: int) -> Tuple[CombinedOptimizer, torch.optim.lr_scheduler.LambdaLR]:
    """One optimizer over a sharded model's parameters (`twotower_lit.sharded.ShardedParts`) and its
    per-step schedule: the fused embedding optimizer; the towers' optimizer; for replicated tables,
    which are plain parameters averaged across ranks, the embedding optimizer and rate in an
    optimizer of their own."""
    dense_cls = DENSE_OPTIMIZERS[cfg.dense_optimizer]
    # on GPUs Adam's update is one fused kernel instead of several per parameter (a host-bound step)
    one_kernel = {"fused": True} if cfg.dense_optimizer in ("adam", "adamw") and all(
        p.is_cuda for p in parts.dense.values()) else {}
    dense = KeyedOptimizerWrapper(
        parts.dense, lambda params: dense_cls(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay, **one_kernel))
    combined: List = [("embedding", parts.fused_optimizer), ("dense", dense)]
    if parts.replicated_tables:
        cls, extra = EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer]
        cls = REPLICATED_TABLE_OPTIMIZERS.get(cfg.embedding_optimizer, cls)
        combined.append(("replicated_tables", KeyedOptimizerWrapper(
            parts.replicated_tables, lambda params: cls(params, lr=cfg.embedding_lr, **extra))))
    optimizer = OneClosureCombinedOptimizer(combined)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total_steps))
    return optimizer, schedule


class GroupedRowWiseAdagrad(RowWiseAdagrad):
    """TorchRec's `RowWiseAdagrad` (the same arguments, state and update) stepping all tables of
    a parameter group together.

    Why: data_parallel tables are trained by a plain optimizer after the backward pass, and
    TorchRec's loops over the tables with about six small GPU operations each, plus Python per
    table: host work on a host-bound GPU step (`benchmarks/GPU_RESULTS.md` has the profile). Here
    the tables of one width are updated as one ``(rows, width)`` block.

    Tables that are, in row order, adjacent slices of one fused weight (the tables of a
    data_parallel lookup: `twotower_lit.patches.fused_weight_slice`) are stepped on that weight and
    gradient directly, with their accumulators kept as views of one tensor; other parameters are
    concatenated.

    The update of each row is TorchRec's: ``sum += mean(g^2)``, ``w -= clr * g / (sqrt(sum) + eps)``
    with ``clr = lr / (1 + (step - 1) * lr_decay)`` (``g`` with weight decay and sign of
    ``maximize`` applied). Each table keeps its own ``sum`` and ``step`` under TorchRec's names, so
    checkpoints load into either class. In a step captured as a CUDA graph (`twotower_lit.graphs`)
    the step counts, host tensors, are counted again after every replay."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            blocks: Dict[Tuple[int, torch.device, torch.dtype], List[torch.Tensor]] = {}
            for p in group["params"]:
                blocks.setdefault((p.shape[1], p.device, p.dtype), []).append(p)
            for params in blocks.values():
                fused = patches.fused_weight_slice(params)
                if fused is not None and fused[0].grad is not None:
                    self._step_fused(params, *fused, group)
                else:
                    self._step_tables(params, group)
        return loss

    def _step_tables(self, params: List[torch.Tensor], group: Dict[str, Any]) -> None:
        """Tables with gradients of their own: concatenated into one block, split back."""
        stepped, grads = [], []
        for p in params:
            grad = p.grad  # read once: a data_parallel table's .grad is a property that slices
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("RowWise adagrad cannot be used with sparse gradients")
            stepped.append(p)
            grads.append(grad)
        if not stepped:
            return
        rows = [p.shape[0] for p in stepped]
        states = [self.state[p] for p in stepped]
        g = self._transformed(torch.cat(grads), torch.cat([p.detach() for p in stepped])
                              if group["weight_decay"] else None, group)
        scaled = g.div_(self._denominator(states, g, group))
        rates = self._rates(states, group)
        updates = list(scaled.split(rows))
        if len(set(rates)) == 1:
            torch._foreach_add_(stepped, updates, alpha=rates[0])
        else:
            torch._foreach_add_(stepped, torch._foreach_mul(updates, rates))

    def _step_fused(self, params: List[torch.Tensor], base: torch.Tensor, start: int, end: int,
                    group: Dict[str, Any]) -> None:
        """Tables that are the rows [start, end) of one fused weight `base`, in order, stepped on
        its rows and gradient (views, no copies)."""
        width, weight, grad = params[0].shape[1], base.detach(), base.grad
        if grad.is_sparse:
            raise RuntimeError("RowWise adagrad cannot be used with sparse gradients")
        if start != 0 or end != base.numel():
            weight, grad = weight[start:end], grad[start:end]
        weight, grad = weight.view(-1, width), grad.view(-1, width)
        states = [self.state[p] for p in params]
        g = self._transformed(grad, weight, group)
        denominator = self._denominator(states, g, group)
        rates = self._rates(states, group)
        if len(set(rates)) == 1:
            weight.addcdiv_(g, denominator, value=rates[0])
        else:
            rows = [p.shape[0] for p in params]
            for w, gi, d, rate in zip(weight.split(rows), g.split(rows), denominator.split(rows), rates):
                w.addcdiv_(gi, d, value=rate)

    @staticmethod
    def _transformed(g: torch.Tensor, weight: Optional[torch.Tensor], group: Dict[str, Any]) -> torch.Tensor:
        """The gradient with weight decay and ``maximize``'s sign applied; a new tensor (`g` is
        divided in place by the caller when it is a concatenation of its own)."""
        if group["weight_decay"] != 0:
            g = g.add(weight, alpha=group["weight_decay"])
        if group["maximize"]:
            g = g.neg()
        return g

    @classmethod
    def _denominator(cls, states: List[Dict[str, Any]], g: torch.Tensor, group: Dict[str, Any]) -> torch.Tensor:
        """``sqrt(sum) + eps`` per row of the block `g` (the tables of `states`, in order), after adding
        this step's mean squared gradient to each row's ``sum``."""
        total = cls._joined_sums(states)
        # mean(g^2) per row as norm^2 / width: one pass over `g` (a replicated table's gradient is
        # dense, every row of the table), where square().mean() writes and reads a squared copy
        norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        total.addcmul_(norm, norm, value=1.0 / g.shape[1])
        return total.sqrt().add_(group["eps"])

    @staticmethod
    def _rates(states: List[Dict[str, Any]], group: Dict[str, Any]) -> List[float]:
        """Count this step in each table's step count and return each table's signed learning rate.
        The counts are host tensors, as TorchRec keeps them; they are read only when the rate
        decays with them."""
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        lr, decay = group["lr"], group["lr_decay"]
        if decay == 0:
            on_every_replay(functools.partial(torch._foreach_add_, steps, 1))
            return [-lr] * len(states)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a learning rate that decays with the step count is computed on the host at every "
                               "step, which a CUDA graph cannot replay: set lr_decay 0, or train without CUDA graphs "
                               "(--cuda-graphs off)")
        return [-lr / (1 + (float(s) - 1) * decay) for s in steps]

    @staticmethod
    def _joined_sums(states: List[Dict[str, Any]]) -> torch.Tensor:
        """One accumulator for the tables of `states`, each table's ``sum`` a view of it. Made on
        the first step, and again after a state dict was loaded (which gives each table a tensor
        of its own) or when other tables than last time have gradients (`_step_tables`)."""
        sums = [s["sum"] for s in states]
        total, offset = sums[0]._base, 0
        if total is not None and total.is_contiguous():
            for s in sums:
                if s._base is not total or s.storage_offset() != total.storage_offset() + offset:
                    break
                offset += s.numel()
            else:
                if total.shape == (offset, 1):  # (TorchRec's own accumulator is a view of a 1-D tensor)
                    return total
        total = torch.cat(sums)
        for state, view in zip(states, total.split([s.shape[0] for s in sums])):
            state["sum"] = view
        return total


# the same update for data_parallel tables, which are stepped after the backward pass (one step for all tables)
REPLICATED_TABLE_OPTIMIZERS = {"rowwise_adagrad": GroupedRowWiseAdagrad}
