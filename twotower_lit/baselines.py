"""Reference models for the quality benchmark, trained on the same prepared shards as the two-tower.

- `IdLogisticRegression`: logit = b + w_user + w_item (no interaction: the "who is generous, which
  movie is good" model every personalised model has to beat).
- `MatrixFactorization`: logit = b + b_user + b_item + <p_user, q_item> (plain MF, no side features).

Both are small plain-PyTorch models trained with BCE on the rated training rows (the workshop's
framing: "liked, given rated"), L2-regularised on the rows a batch touches, and early-stopped on
validation log-loss. Their figures come from `twotower_lit.metrics`, like every other model's:
AUC / log-loss over a split's rated rows, Recall@k / NDCG@k by full ranking of unseen items
(the score a model would rank by is a dot product of `ranking_vectors`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from twotower_lit.data.datamodule import MovieLensDataModule
from twotower_lit.metrics import binary_metrics, rank_users


class IdLogisticRegression(nn.Module):
    """P(liked | user, item) = sigmoid(b + w_user + w_item)."""

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, the rows' parameters' squared norm for the L2 penalty)."""
        wu, wi = self.user_bias(users).squeeze(1), self.item_bias(items).squeeze(1)
        return self.bias + wu + wi, wu.pow(2) + wi.pow(2)

    def ranking_vectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(user, item) vectors whose dot product orders a user's items like the logit does (the
        user's own terms are the same for all of them)."""
        items = self.item_bias.weight.detach()
        return torch.ones(self.user_bias.num_embeddings, 1), items


class MatrixFactorization(nn.Module):
    """P(liked | user, item) = sigmoid(b + b_user + b_item + <p_user, q_item>)."""

    def __init__(self, num_users: int, num_items: int, dim: int = 32) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        for table in (self.user_bias, self.item_bias):
            nn.init.zeros_(table.weight)
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=0.01)  # small, so training starts from the bias model

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        bu, bi = self.user_bias(users).squeeze(1), self.item_bias(items).squeeze(1)
        p, q = self.user(users), self.item(items)
        logits = self.bias + bu + bi + (p * q).sum(1)
        return logits, bu.pow(2) + bi.pow(2) + p.pow(2).sum(1) + q.pow(2).sum(1)

    def ranking_vectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """[p_user, 1] . [q_item, b_item] = the logit up to the user's own bias."""
        users = torch.cat([self.user.weight, torch.ones(self.user.num_embeddings, 1)], 1).detach()
        items = torch.cat([self.item.weight, self.item_bias.weight], 1).detach()
        return users, items


@dataclass
class FitConfig:
    """How a baseline is trained: Adam on mini-batches, L2 on the touched rows, early stopping."""

    epochs: int = 50
    batch_size: int = 4096
    lr: float = 0.01
    l2: float = 1e-4
    patience: int = 3  # epochs without a better validation log-loss before stopping
    seed: int = 0


def _tensors(split: Dict[str, np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(split["user"].astype(np.int64)), torch.from_numpy(split["item"].astype(np.int64)),
            torch.from_numpy(split["label"].astype(np.float32)))


def fit(model: nn.Module, train: Dict[str, np.ndarray], val: Dict[str, np.ndarray],
        cfg: FitConfig = FitConfig()) -> Dict[str, float]:
    """Train `model` with BCE on the rated `train` rows; keep the epoch with the best validation
    log-loss. Returns {"epochs": epochs run, "best_epoch": .., "val_logloss": ..}."""
    torch.manual_seed(cfg.seed)
    users, items, labels = _tensors(train)
    vu, vi, vy = _tensors(val)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, best_state, best_epoch, epoch = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for idx in torch.randperm(len(labels)).split(cfg.batch_size):
            logits, sq = model(users[idx], items[idx])
            loss = F.binary_cross_entropy_with_logits(logits, labels[idx]) + cfg.l2 * sq.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(F.binary_cross_entropy_with_logits(model(vu, vi)[0], vy))
        if val_loss < best:
            best, best_state, best_epoch = val_loss, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    return {"epochs": epoch, "best_epoch": best_epoch, "val_logloss": best}


@torch.no_grad()
def evaluate(model: nn.Module, dm: MovieLensDataModule, split: str, k: int) -> Dict[str, float]:
    """AUC / log-loss / accuracy over `split`'s rated rows and Recall@k / NDCG@k by full ranking
    (items seen in training excluded), with the same functions as the two-tower's figures."""
    model.eval()
    rows = dm.splits[split]
    users, items, _ = _tensors(rows)
    out = binary_metrics(torch.sigmoid(model(users, items)[0]).numpy(), rows["label"])
    ranked = np.unique(rows["user"]).astype(np.int64)
    user_vecs, item_vecs = model.ranking_vectors()
    out.update(rank_users(user_vecs[torch.from_numpy(ranked)], ranked, item_vecs, dm.seen, dm.positives[split],
                          k).as_dict(k))
    return out


def train_and_evaluate(name: str, dm: MovieLensDataModule, k: int = 10, split: str = "test",
                       cfg: FitConfig = FitConfig(), dim: int = 32) -> Dict[str, float]:
    """Fit the baseline `name` ("logreg" or "mf") on `dm`'s training rows and evaluate it on `split`."""
    dm.load()
    if name == "logreg":
        model: nn.Module = IdLogisticRegression(dm.num_users, dm.num_items)
    elif name == "mf":
        model = MatrixFactorization(dm.num_users, dm.num_items, dim)
    else:
        raise ValueError(f"unknown baseline {name!r}; choose logreg or mf")
    info = fit(model, dm.splits["train"], dm.splits["val"], cfg)
    out = evaluate(model, dm, split, k)
    out.update({f"fit_{key}": value for key, value in info.items()})
    return out
