"""Metrics of an exported model on a prepared split, computed from the artifact alone."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from twotower_lit.data.csr import Csr, positives_csr
from twotower_lit.export.format import ExportedModel, load_export
from twotower_lit.layers import logits
from twotower_lit.metrics import binary_metrics, rank_users


def read_split(data_dir: str, split: str) -> Dict[str, np.ndarray]:
    from twotower_lit.data.datamodule import load_manifest, read_split as read_rows

    rows = read_rows(data_dir, load_manifest(data_dir), split)
    return {c: rows[c].astype(np.float32 if c == "label" else np.int64) for c in rows}


@torch.no_grad()
def evaluate_export(model: ExportedModel, rows: Dict[str, np.ndarray], k: int = 10) -> Dict[str, float]:
    """AUC / log-loss / accuracy over the split's rated rows, the retrieval metrics (`rank_users`) by full
    ranking, popularity from the export's training pairs as in training."""
    num_users = model.user_features.shape[0]
    if rows["user"].max(initial=0) >= num_users or rows["item"].max(initial=0) > model.num_items:
        raise ValueError("the split has user/item indices outside the model's vocabularies: was the model "
                         "trained on this prepared dataset?")
    # item index i is row i of `items` (row 0: the out-of-vocabulary item, never ranked)
    items = torch.cat([torch.zeros(1, model.item_vectors.shape[1]), model.item_vectors])
    users = np.unique(rows["user"])
    user_vecs = torch.zeros(num_users, items.shape[1])
    user_vecs[users] = model.user_vectors(model.user_features[torch.from_numpy(users)])
    u, i = torch.from_numpy(rows["user"]), torch.from_numpy(rows["item"])
    probs = torch.sigmoid(logits(user_vecs[u], items[i], model.exposure_dims)).numpy()
    out = binary_metrics(probs, rows["label"])
    seen = Csr(model.seen_indptr.numpy(), model.seen_items.numpy())
    positives = positives_csr(rows["user"], rows["item"], rows["label"], num_users)
    totals = rank_users(user_vecs[users], users, items, seen, positives, k)
    out.update(totals.as_dict(k))
    return out


def evaluate_model_dir(model_dir: str, data_dir: str, split: str = "test", k: int = 10) -> Dict[str, float]:
    return evaluate_export(load_export(model_dir), read_split(data_dir, split), k)
