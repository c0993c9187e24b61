"""Random exported models (the real `save_export` format) for serving tests and benchmarks."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from twotower_lit.data.features import AGE_GROUPS, MOVIELENS_GENRES
from twotower_lit.export.format import UserTower, save_export

USER_FEATURES = ("user", "gender", "age", "occupation", "zip")


def random_export(model_dir: str, num_users: int = 50, num_items: int = 200, embedding_dim: int = 16,
                  user_layers: Sequence[int] = (32, 16), seen_per_user: int = 20, num_zips: int = 30,
                  seed: int = 0, model_version: Optional[str] = None, first_user_id: int = 1,
                  first_item_id: int = 1) -> Dict:
    """Write a random model directory: users with raw ids ``first_user_id + i``, items with raw ids
    ``first_item_id + 10 * j`` (so ids and indices differ), ml-1m-like side vocabularies, a seen
    CSR of ``seen_per_user`` items per user. Returns the manifest."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    vocab = {"gender": ["F", "M"], "age": list(AGE_GROUPS), "occupation": [str(i) for i in range(21)],
             "zip": sorted({f"{z:03d}" for z in rng.choice(1000, size=num_zips, replace=False)}),
             "genres": list(MOVIELENS_GENRES)}
    rows = {"user": num_users + 1, "gender": len(vocab["gender"]) + 1, "age": len(vocab["age"]) + 1,
            "occupation": len(vocab["occupation"]) + 1, "zip": len(vocab["zip"]) + 1}
    torch.manual_seed(seed)
    tower = UserTower(rows, embedding_dim, list(user_layers))
    tensors = {f"user.{k}": v.detach().clone() for k, v in tower.state_dict().items()}
    out_dim = list(user_layers)[-1]
    tensors["item.vectors"] = torch.randn(num_items, out_dim, generator=g) / out_dim ** 0.5
    tensors["item.popularity"] = torch.from_numpy(rng.zipf(1.5, size=num_items).clip(max=10_000).astype(np.float32))
    features = np.zeros((num_users + 1, len(USER_FEATURES)), dtype=np.int64)
    features[1:, 0] = np.arange(1, num_users + 1)
    for j, name in enumerate(USER_FEATURES[1:], start=1):
        features[1:, j] = rng.integers(1, rows[name], size=num_users)
    tensors["user.features"] = torch.from_numpy(features)
    seen = [np.sort(rng.choice(np.arange(1, num_items + 1), size=min(seen_per_user, num_items), replace=False))
            for _ in range(num_users)]
    indptr = np.zeros(num_users + 2, dtype=np.int64)
    indptr[2:] = np.cumsum([len(s) for s in seen])
    tensors["seen.indptr"] = torch.from_numpy(indptr)
    tensors["seen.items"] = torch.from_numpy(np.concatenate(seen).astype(np.int64) if seen else np.zeros(0, np.int64))
    items = [{"id": first_item_id + 10 * j, "title": f"Movie {j} ({1950 + j % 70})",
              "genres": [vocab["genres"][int(x)]
                         for x in rng.choice(len(vocab["genres"]), size=1 + j % 3, replace=False)]}
             for j in range(num_items)]
    config = {"embedding_dim": embedding_dim, "user_features": list(USER_FEATURES), "user_layers": list(user_layers),
              "vocab_sizes": dict(rows, item=num_items + 1), "zip_prefix": 3}
    if model_version:
        config["model_version"] = model_version
    user_ids = [0] + [first_user_id + i for i in range(num_users)]
    return save_export(model_dir, config, tensors, user_ids, items, vocab, {"note": "random weights"})
