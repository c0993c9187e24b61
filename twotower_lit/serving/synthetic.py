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
                  first_item_id: int = 1, item_clusters: int = 0) -> Dict:
    """Write a random model directory: users with raw ids ``first_user_id + i``, items with raw ids
    ``first_item_id + 10 * j`` (so ids and indices differ), ml-1m-like side vocabularies, a seen
    CSR of ``seen_per_user`` items per user. Returns the manifest.

    ``item_clusters`` > 0 draws the item vectors around that many centres, as a trained catalogue's
    items group by taste (what approximate indexes are built for); 0: independent Gaussian vectors.
    Vectorised, so that a catalogue of millions of items is written in seconds."""
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
    if item_clusters > 0:
        centres = torch.randn(item_clusters, out_dim, generator=g)
        member = torch.randint(0, item_clusters, (num_items,), generator=g)
        vectors = centres[member] + 0.5 * torch.randn(num_items, out_dim, generator=g)
    else:
        vectors = torch.randn(num_items, out_dim, generator=g)
    tensors["item.vectors"] = vectors / out_dim ** 0.5
    tensors["item.popularity"] = torch.from_numpy(rng.zipf(1.5, size=num_items).clip(max=10_000).astype(np.float32))
    features = np.zeros((num_users + 1, len(USER_FEATURES)), dtype=np.int64)
    features[1:, 0] = np.arange(1, num_users + 1)
    for j, name in enumerate(USER_FEATURES[1:], start=1):
        features[1:, j] = rng.integers(1, rows[name], size=num_users)
    tensors["user.features"] = torch.from_numpy(features)
    seen = [np.sort(rng.choice(num_items, size=min(seen_per_user, num_items), replace=False) + 1)
            for _ in range(num_users)]
    indptr = np.zeros(num_users + 2, dtype=np.int64)
    indptr[2:] = np.cumsum([len(s) for s in seen])
    tensors["seen.indptr"] = torch.from_numpy(indptr)
    tensors["seen.items"] = torch.from_numpy(np.concatenate(seen).astype(np.int64) if seen else np.zeros(0, np.int64))
    # 1 to 3 distinct genres per item: the first columns of a random permutation of the genres
    picks = np.argsort(rng.random((num_items, len(vocab["genres"]))), axis=1)[:, :3].tolist()
    names = vocab["genres"]
    items = [{"id": first_item_id + 10 * j, "title": f"Movie {j} ({1950 + j % 70})",
              "genres": [names[x] for x in picks[j][:1 + j % 3]]} for j in range(num_items)]
    config = {"embedding_dim": embedding_dim, "user_features": list(USER_FEATURES), "user_layers": list(user_layers),
              "vocab_sizes": dict(rows, item=num_items + 1), "zip_prefix": 3}
    if model_version:
        config["model_version"] = model_version
    user_ids = [0] + [first_user_id + i for i in range(num_users)]
    return save_export(model_dir, config, tensors, user_ids, items, vocab, {"note": "random weights"})
