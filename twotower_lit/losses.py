"""Training objectives of the two-tower model, computed from the two towers' outputs.

- ``bce``: binary cross-entropy of the dot-product logit against the label, over the rated rows
  and any sampled negatives (label 0) the loader appended: the workshop's framing.
- ``softmax``: in-batch sampled softmax for retrieval. Every liked rated row is a query whose
  positive is its own item; the candidates are the items of all rated rows of the (local) batch,
  plus the loader's uniformly drawn negatives when there are any. The negatives were sampled, so
  each one's logit is corrected by the log of its expected count among them (log-Q correction);
  without it popular items, which turn up as in-batch negatives more often, would be pushed down
  and the softmax would learn popularity-debiased scores.
- ``both``: BCE over the rated rows only (so the logit stays "probability of liking, given
  rated", which is what AUC measures) plus ``softmax_weight`` x the softmax term.

The softmax is computed per rank over the local batch; no collectives are needed.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("bce", "softmax", "both")


def sampled_softmax_loss(queries: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
                         candidate_items: torch.Tensor, log_q: torch.Tensor, temperature: float = 1.0,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of each query's positive among sampled candidates (weighted by
    `weights` (Q,) when given: a weight-0 query counts for nothing).

    `queries` (Q, d) and `candidates` (C, d) are tower outputs; `positive` (Q,) is the column of
    each query's own item in `candidates`; `candidate_items` (C,) are item ids; `log_q` (C,) is
    the log of each candidate's expected count in the candidate set.

    This is the sampled softmax of Jean et al. / Bengio & Senecal: the positive's own column is
    the exact term of the partition function, logit ``<q, p> / temperature``; every other column
    is a sample standing for the rest of the catalogue, logit ``<q, c> / temperature - log_q``.
    Other columns holding the positive's item (accidental hits: the same movie rated by another
    user in the batch) are masked, or the positive would be counted twice. (Correcting the
    positive's column as well while masking its duplicates would under-weight popular positives
    and inflate their scores; tests/quality/test_losses.py measures it.)
    """
    scores = queries @ candidates.t() / temperature
    rows = torch.arange(len(positive), device=positive.device)
    logits = scores - log_q.unsqueeze(0)
    logits[rows, positive] = scores[rows, positive]
    hits = candidate_items.unsqueeze(0) == candidate_items[positive].unsqueeze(1)
    hits[rows, positive] = False
    logits = logits.masked_fill(hits, float("-inf"))
    if weights is None:
        return F.cross_entropy(logits, positive)
    return (F.cross_entropy(logits, positive, reduction="none") * weights).sum() / weights.sum().clamp(min=1.0)


class TwoTowerLoss(nn.Module):
    """The training loss of a batch laid out as the loader builds it: ``n`` rated rows first, then
    ``negatives`` sampled unrated items per rated row (label 0).

    ``log_q`` holds, per item, the log of its share of training rows (the in-batch candidates'
    sampling probability); it is a non-persistent buffer, so checkpoints do not carry it and the
    training job sets it from the training data with `set_item_counts`.
    """

    def __init__(self, kind: str = "bce", num_items: int = 1, negatives: int = 0, softmax_weight: float = 1.0,
                 temperature: float = 1.0, vector_l2: float = 0.0) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        if temperature <= 0:
            raise ValueError(f"softmax temperature must be > 0, got {temperature}")
        self.kind = kind
        self.num_items = num_items
        self.negatives = negatives
        self.softmax_weight = softmax_weight
        self.temperature = temperature
        self.vector_l2 = vector_l2
        # until set: every real item equally likely (row 0 is the out-of-vocabulary item)
        self.register_buffer("log_q", torch.full((num_items,), -math.log(max(num_items - 1, 1))),
                             persistent=False)

    @torch.no_grad()
    def set_item_counts(self, counts: np.ndarray) -> None:
        """Training rows per item -> log q. Items never rated get half a count, so an unseen item
        (which can still come as a uniform negative) gets a finite, large correction."""
        c = torch.as_tensor(np.asarray(counts, dtype=np.float64))
        if c.numel() != self.num_items:
            raise ValueError(f"item counts cover {c.numel()} items, the model has {self.num_items}")
        c = c.clamp(min=0.5)
        self.log_q.copy_((c / c.sum()).log().to(self.log_q.dtype))

    def forward(self, user: torch.Tensor, item: torch.Tensor, items: torch.Tensor,
                labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, its parts) of one batch: `user`/`item` are the tower outputs per row, `items`
        the item id of each row, `labels` 1 for liked rated rows and 0 otherwise."""
        rows = len(labels)
        if rows % (1 + self.negatives):
            raise ValueError(f"a batch of {rows} rows cannot be n rated rows + {self.negatives} negatives each")
        n_rated = rows // (1 + self.negatives)
        logits = (user * item).sum(dim=1)
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
            parts["l2"] = (user.pow(2).sum(1) + item.pow(2).sum(1)).mean()
            loss = loss + self.vector_l2 * parts["l2"]
        return loss, parts

    def softmax(self, user: torch.Tensor, item: torch.Tensor, items: torch.Tensor, labels: torch.Tensor,
                n_rated: int) -> torch.Tensor:
        """In-batch sampled softmax over this batch (every row's item is a candidate)."""
        n_sampled = len(labels) - n_rated
        # Expected count of an item among a query's negatives: the other n_rated - 1 rows, draws
        # from the training-row distribution q, plus n_sampled uniform draws over the real items.
        q = self.log_q.exp()[items]
        expected = (n_rated - 1) * q + n_sampled / max(self.num_items - 1, 1)
        # Every rated row is scored as a query and the liked ones are kept by weight, not by
        # selection: no data-dependent shapes, so no host sync on a GPU.
        liked = (labels[:n_rated] > 0.5).to(user.dtype)
        rows = torch.arange(n_rated, device=user.device)
        return sampled_softmax_loss(user[:n_rated], item, rows, items, expected.log(), self.temperature, liked)

