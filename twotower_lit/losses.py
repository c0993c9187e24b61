"""Training objectives of the two-tower model, computed from the two towers' outputs.

- ``bce``: binary cross-entropy of the dot-product logit against the label, over the rated rows
  and any sampled negatives (label 0) the loader appended: the workshop's framing.
- ``softmax``: in-batch sampled softmax for retrieval. Every liked rated row is a query whose
  positive is its own item; the candidates are the items of the rated rows of its block of the
  (local) batch, plus the block's share of the loader's uniformly drawn negatives when there are
  any. A block is ``softmax_rows`` rated rows (here by default the whole batch; the training
  job's ``--softmax-rows`` defaults to 1,024): the scores of a block are a rows x candidates matrix, so without blocks a
  65,536-row GPU batch would build 4.3 billion of them per step. The negatives were sampled, so
  each one's logit is corrected by the log of its expected count among them (log-Q correction);
  without it popular items, which turn up as in-batch negatives more often, would be pushed down
  and the softmax would learn popularity-debiased scores.
- ``both``: BCE over the rated rows only (so the logit stays "probability of liking, given
  rated", which is what AUC measures) plus ``softmax_weight`` x the softmax term. With
  ``exposure_dims``, the BCE logit leaves out the tower outputs' last dimensions and the softmax
  scores the whole dot product (see `twotower_lit.model.TwoTower`).

With several processes the softmax's candidates are every rank's (``candidates``, a
`CandidateExchange`: the training job passes `twotower_lit.distributed.candidates.AllRanks`): block
b of each rank is scored against block b of every rank, so N processes train the softmax that one
process trains over N times the rows, and each item vector gets the gradients of every rank's
queries. Without it, each rank's blocks are its own.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from twotower_lit.layers import logits as liking_logits

LOSSES = ("bce", "softmax", "both")


def sampled_softmax_loss(queries: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
                         candidate_items: torch.Tensor, log_q: torch.Tensor, temperature: float = 1.0,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of each query's positive among sampled candidates (weighted by
    `weights` (Q,) when given: a weight-0 query counts for nothing).

    `queries` (Q, d) and `candidates` (C, d) are tower outputs; `positive` (Q,) is the column of
    each query's own item in `candidates`; `candidate_items` (C,) are item ids; `log_q` (C,) is
    the log of each candidate's expected count in the candidate set. Leading dimensions before
    those are independent blocks (`TwoTowerLoss` scores a large batch block by block).

    This is the sampled softmax of Jean et al. / Bengio & Senecal: the positive's own column is
    the exact term of the partition function, logit ``<q, p> / temperature``; every other column
    is a sample standing for the rest of the catalogue, logit ``<q, c> / temperature - log_q``.
    Other columns holding the positive's item (accidental hits: the same movie rated by another
    user in the batch) are masked, or the positive would be counted twice. (Correcting the
    positive's column as well while masking its duplicates would under-weight popular positives
    and inflate their scores; tests/quality/test_losses.py measures it.)
    """
    total, weight = sampled_softmax_terms(queries, candidates, positive, candidate_items, log_q, temperature, weights)
    return total / weight.clamp(min=1.0)


def sampled_softmax_terms(queries: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
                          candidate_items: torch.Tensor, log_q: torch.Tensor, temperature: float = 1.0,
                          weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of the queries' weighted cross-entropies, sum of their weights) of `sampled_softmax_loss`:
    the terms of `plain_sampled_softmax_terms`, computed by `_SampledSoftmaxCrossEntropy`."""
    if weights is None:
        weights = queries.new_ones(positive.shape)
    if log_q.requires_grad or weights.requires_grad:
        raise ValueError("the sampled softmax takes gradients for the queries and candidates only: pass log_q and "
                         "weights detached")
    total = _SampledSoftmaxCrossEntropy.apply(queries / temperature, candidates, log_q, positive, candidate_items,
                                              weights)
    return total, weights.sum()


def plain_sampled_softmax_terms(queries: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
                                candidate_items: torch.Tensor, log_q: torch.Tensor, temperature: float = 1.0,
                                weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`sampled_softmax_terms` written with autograd's operations: its definition, which the tests
    and `benchmarks/loss_bench.py` compare it with."""
    scores = queries @ candidates.transpose(-1, -2) / temperature  # (..., Q, C)
    column = positive.unsqueeze(-1)  # (..., Q, 1)
    own = scores.gather(-1, column)
    logits = (scores - log_q.unsqueeze(-2)).scatter(-1, column, own)
    # other columns holding the query's own item (accidental hits), not its own column
    hits = candidate_items.unsqueeze(-2) == candidate_items.gather(-1, positive).unsqueeze(-1)
    hits = hits.scatter(-1, column, False)
    logits = logits.masked_fill(hits, float("-inf"))
    cross_entropy = F.cross_entropy(logits.flatten(0, -2), positive.flatten(), reduction="none").view_as(positive)
    if weights is None:
        weights = torch.ones_like(cross_entropy)
    return (cross_entropy * weights).sum(), weights.sum()


class _SampledSoftmaxCrossEntropy(torch.autograd.Function):
    """``sum(weights * cross-entropy)`` of `plain_sampled_softmax_terms`, from queries already
    divided by the temperature, with its backward pass written out.

    Why by hand: the score matrix (queries x candidates per block: 67 M scores for a 65,536-row
    batch in blocks of 1,024) is the largest tensor of the training step, and every elementwise
    operation over it is a pass through GPU memory. Written plainly, autograd makes about 25 such
    passes forward and backward (the division by the temperature, the correction, the scatter of
    the positive's column, the mask and its scatter, the cross-entropy, and each one's backward
    pass). Here: the temperature is applied to the queries (Q x d, not Q x C), the correction and
    the mask are applied in place, the positive's column is restored after masking (so the mask
    needs no scatter of its own), and the backward pass needs no elementwise pass but one
    exponential: the gradient of the scores is ``weight x (softmax - one-hot)`` per row, and the
    per-row weight is applied to the (small) operands of the two products instead of the matrix.
    Masked columns have probability 0, so they get no gradient, as their constant -inf gets none.
    The values are the plain expression's (tests/quality/test_losses.py compares them, gradients
    included); it takes about half the time and memory of the plain expression
    (`benchmarks/loss_bench.py`, figures in `benchmarks/GPU_RESULTS.md`)."""

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, candidates: torch.Tensor, log_q: torch.Tensor,
                positive: torch.Tensor, candidate_items: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        column = positive.unsqueeze(-1)  # (..., Q, 1)
        logits = queries @ candidates.transpose(-1, -2)  # (..., Q, C)
        own = logits.gather(-1, column)
        logits.sub_(log_q.unsqueeze(-2))
        # every column holding the query's own item, its own column included: that one gets its
        # uncorrected score back next
        logits.masked_fill_(candidate_items.unsqueeze(-2) == candidate_items.gather(-1, positive).unsqueeze(-1),
                            float("-inf"))
        logits.scatter_(-1, column, own)
        log_p = torch.log_softmax(logits, dim=-1)
        del logits
        ctx.save_for_backward(queries, candidates, log_p, column, weights)
        return -(log_p.gather(-1, column).squeeze(-1) * weights).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        queries, candidates, log_p, column, weights = ctx.saved_tensors
        scale = (grad * weights).unsqueeze(-1)  # (..., Q, 1): each row's factor
        d_logits = log_p.exp()
        d_logits.scatter_add_(-1, column, torch.full(column.shape, -1.0, dtype=d_logits.dtype,
                                                     device=d_logits.device))
        d_queries = (d_logits @ candidates) * scale if ctx.needs_input_grad[0] else None
        d_candidates = d_logits.transpose(-1, -2) @ (queries * scale) if ctx.needs_input_grad[1] else None
        return d_queries, d_candidates, None, None, None, None


class _MeanSquaredNorm(torch.autograd.Function):
    """``(user.pow(2).sum(1) + item.pow(2).sum(1)).mean()`` with a backward pass written out.

    Why by hand: the training step on a GPU is bound by its host's work per tensor operation,
    and autograd's graph of that expression runs 20 operations forward and backward, this one 11
    (its gradient, ``2 x / rows`` times the upstream one, is the same; tests/quality/test_losses.py
    checks it against autograd's)."""

    @staticmethod
    def forward(ctx: Any, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(user, item)
        return (user.square().sum() + item.square().sum()) / user.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        user, item = ctx.saved_tensors
        scale = grad * (2.0 / user.shape[0])
        return user * scale, item * scale


def mean_squared_norm(user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of the squared norms of their user and item vectors (same row count)."""
    if user.shape[0] != item.shape[0]:
        raise ValueError(f"{user.shape[0]} user vectors and {item.shape[0]} item vectors: one of each per row")
    return _MeanSquaredNorm.apply(user, item)


class CandidateExchange(Protocol):
    """How the softmax's candidates are shared between ranks (`TwoTowerLoss`'s ``candidates``)."""

    world: int  # ranks taking part; 1: none to share with
    rank: int  # this one's place among them

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world x rows, ...): every rank's rows in rank order; gradients return to their owner."""

    def gather_ids(self, tensor: torch.Tensor) -> torch.Tensor:
        """As `gather`, for a tensor without gradients."""

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor without gradients over every rank."""


def _blocks(x: torch.Tensor, lo: int, hi: int, k: int, world: int) -> torch.Tensor:
    """Rows ``lo:hi`` of every rank's part of `x` (``world`` x rows x ..., gathered in rank order),
    as `k` blocks holding block j of every rank: (k, world x (hi - lo) / k, ...)."""
    if world == 1:
        return x[lo:hi].view(k, (hi - lo) // k, *x.shape[1:])
    per_rank = x.view(world, -1, *x.shape[1:])[:, lo:hi]
    return per_rank.reshape(world, k, (hi - lo) // k, *x.shape[1:]).transpose(0, 1).flatten(1, 2)


class TwoTowerLoss(nn.Module):
    """The training loss of a batch laid out as the loader builds it: ``n`` rated rows first, then
    ``negatives`` sampled unrated items per rated row (label 0).

    ``log_q`` holds, per item, the log of its share of training rows (the in-batch candidates'
    sampling probability); it is a non-persistent buffer, so checkpoints do not carry it and the
    training job sets it from the training data with `set_item_counts`. ``candidates``: the
    softmax's candidates are every rank's (see the module's doc); every rank's batch must then have
    as many rows as the others'.
    """

    def __init__(self, kind: str = "bce", num_items: int = 1, negatives: int = 0, softmax_weight: float = 1.0,
                 temperature: float = 1.0, vector_l2: float = 0.0, softmax_rows: int = 0,
                 exposure_dims: int = 0, candidates: Optional[CandidateExchange] = None) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        if temperature <= 0:
            raise ValueError(f"softmax temperature must be > 0, got {temperature}")
        if softmax_rows < 0:
            raise ValueError(f"softmax_rows must be >= 0 (0: the whole batch), got {softmax_rows}")
        self.kind = kind
        self.num_items = num_items
        self.negatives = negatives
        self.softmax_weight = softmax_weight
        self.temperature = temperature
        self.vector_l2 = vector_l2
        self.softmax_rows = softmax_rows
        self.exposure_dims = exposure_dims  # the BCE term's logit leaves them out; the softmax uses them
        self.candidates = candidates
        # until set: every real item equally likely (row 0 is the out-of-vocabulary item), in the
        # batch and among the sampled negatives
        self.register_buffer("log_q", torch.full((num_items,), -math.log(max(num_items - 1, 1))),
                             persistent=False)
        self.register_buffer("negative_q", torch.full((num_items,), 1.0 / max(num_items - 1, 1)), persistent=False)

    @torch.no_grad()
    def set_item_counts(self, counts: np.ndarray, negative_probabilities: Optional[np.ndarray] = None) -> None:
        """Training rows per item -> log q, and each item's probability of being drawn as a sampled
        negative (`twotower_lit.data.negatives.negative_probabilities`; default uniform). Items never
        rated get half a count, so an unseen item (which can still come as a negative) gets a
        finite, large correction."""
        c = torch.as_tensor(np.asarray(counts, dtype=np.float64))
        if c.numel() != self.num_items:
            raise ValueError(f"item counts cover {c.numel()} items, the model has {self.num_items}")
        c = c.clamp(min=0.5)
        self.log_q.copy_((c / c.sum()).log().to(self.log_q.dtype))
        if negative_probabilities is not None:
            p = torch.as_tensor(np.asarray(negative_probabilities, dtype=np.float64))
            if p.numel() != self.num_items:
                raise ValueError(f"negative probabilities cover {p.numel()} items, the model has {self.num_items}")
            self.negative_q.copy_(p.to(self.negative_q.dtype))

    def forward(self, user: torch.Tensor, item: torch.Tensor, items: torch.Tensor,
                labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, its parts) of one batch: `user`/`item` are the tower outputs per row, `items`
        the item id of each row, `labels` 1 for liked rated rows and 0 otherwise."""
        rows = len(labels)
        if rows % (1 + self.negatives):
            raise ValueError(f"a batch of {rows} rows cannot be n rated rows + {self.negatives} negatives each")
        n_rated = rows // (1 + self.negatives)
        logits = liking_logits(user, item, self.exposure_dims)
        parts: Dict[str, torch.Tensor] = {}
        if self.kind == "bce":
            parts["bce"] = loss = F.binary_cross_entropy_with_logits(logits, labels)
        else:
            if self.kind == "both":
                parts["bce"] = F.binary_cross_entropy_with_logits(logits[:n_rated], labels[:n_rated])
            parts["softmax"] = self.softmax(user, item, items, labels, n_rated)
            loss = parts["softmax"] if self.kind == "softmax" else parts["bce"] + self.softmax_weight * parts["softmax"]
        if self.vector_l2:
            # the tower outputs' size, like the L2 on factors of matrix factorisation: without it
            # the rated-pair BCE keeps growing the vectors and overfits after a few epochs
            parts["l2"] = mean_squared_norm(user, item)
            loss = loss + self.vector_l2 * parts["l2"]
        return loss, parts

    def softmax(self, user: torch.Tensor, item: torch.Tensor, items: torch.Tensor, labels: torch.Tensor,
                n_rated: int) -> torch.Tensor:
        """In-batch sampled softmax, over blocks of ``softmax_rows`` rated rows: each block's
        liked rows are the queries, and the items of its rated rows and of its share of the
        sampled negatives (of every rank's same block, with ``candidates``) are the candidates.
        One batched product per block size (at most two: the full blocks, and what is left), so
        the cost grows with the batch, not its square."""
        negatives = self.negatives
        block = min(self.softmax_rows or n_rated, n_rated)
        full = n_rated - n_rated % block if block else 0
        world = self.candidates.world if self.candidates is not None else 1
        if world > 1:
            item, items = self.candidates.gather(item), self.candidates.gather_ids(items)
        rank = self.candidates.rank if world > 1 else 0
        q = self.log_q.exp()
        total = weight = user.new_zeros(())
        for lo, hi, size in ((0, full, block), (full, n_rated, n_rated - full)):
            if hi == lo:
                continue
            k, dim = (hi - lo) // size, user.shape[1]
            negs = (n_rated + lo * negatives, n_rated + hi * negatives)  # this part's share of the negatives
            candidates = torch.cat([_blocks(item, lo, hi, k, world), _blocks(item, *negs, k, world)], 1)
            candidate_items = torch.cat([_blocks(items, lo, hi, k, world), _blocks(items, *negs, k, world)], 1)
            # Expected count of an item among a query's negatives, from each source by its own
            # probability (mixed negative sampling): the other world x size - 1 rated rows of its
            # block, draws from the training-row distribution q, plus the block's world x size x
            # negatives draws of the loader's sampler.
            expected = (world * size - 1) * q[candidate_items]
            if negatives:
                expected = expected + world * size * negatives * self.negative_q[candidate_items]
            # Every rated row is scored as a query and the liked ones are kept by weight, not by
            # selection: no data-dependent shapes, so no host sync on a GPU.
            liked = (labels[lo:hi] > 0.5).to(user.dtype).view(k, size)
            positive = torch.arange(rank * size, (rank + 1) * size, device=user.device).expand(k, size)
            t, w = sampled_softmax_terms(user[lo:hi].view(k, size, dim), candidates, positive, candidate_items,
                                         expected.log(), self.temperature, liked)
            total, weight = total + t, weight + w
        if world > 1:
            # the mean over every rank's liked rows, times the ranks: the gradient averaging of
            # the towers divides by them again
            return total * world / self.candidates.total(weight).clamp(min=1.0)
        return total / weight.clamp(min=1.0)
