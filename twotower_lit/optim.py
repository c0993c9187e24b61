"""Optimizers of the replicated (data_parallel) embedding tables."""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.optim import RowWiseAdagrad

from twotower_lit.graphs import on_every_replay


class GroupedRowWiseAdagrad(RowWiseAdagrad):
    """TorchRec's `RowWiseAdagrad` (the same arguments, state and update) stepping all tables of
    a parameter group together.

    Why: data_parallel tables are trained by a plain optimizer after the backward pass, and
    TorchRec's loops over the tables with about six small GPU operations each, plus Python per
    table. With the eight tables replicated on two GPUs it was the costliest host op of a step
    in a profile (1.4 ms per ~4.2 ms step on an H200, `benchmarks/train_throughput.py --trace`).
    Here the tables of one width are updated as one ``(rows, width)`` block: one row mean, one
    square root and one division for all of them. On two H200s (ML-32M shape, 65,536 rows per
    GPU) a step launched 108 kernels instead of 147 and trained 4-7% faster in memory and 3% faster
    end to end (`benchmarks/GPU_RESULTS.md`).

    Tables that are, in row order, adjacent slices of one fused weight (TorchRec's
    ``TableBatchedEmbeddingSlice``: the tables of a data_parallel lookup are views of its fbgemm
    module's single weight, whose gradient is one tensor too) are stepped on that weight and
    gradient directly, with their accumulators kept as views of one tensor: 12 tensor operations
    per step for the eight tables of the training job (6 of them compute), instead of 38 (16 to
    slice each table's gradient out of the fused one, one concatenation to put them back together,
    one more for the accumulators, and a host read of each table's step count). Other parameters
    are concatenated.

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
                fused = _fused_weight(params)
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


def _fused_weight(params: List[torch.Tensor]) -> Optional[Tuple[torch.Tensor, int, int]]:
    """(fused weight, start, end) when `params`, in order, are TorchRec ``TableBatchedEmbeddingSlice``
    views of adjacent ranges [start, end) of one fused weight; None otherwise."""
    base = getattr(params[0], "_original_tensor", None)
    if base is None:
        return None
    start = end = getattr(params[0], "_start_offset", None)
    for p in params:
        if getattr(p, "_original_tensor", None) is not base or getattr(p, "_start_offset", None) != end:
            return None
        end = p._end_offset
    return base, start, end
