"""Writes the exported model directory from a trained (unsharded) model state."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from twotower_lit.config import ModelConfig
from twotower_lit.data.datamodule import MovieLensDataModule, join
from twotower_lit.data.loader import read_columns
from twotower_lit.data.schema import ITEMS_FILE, USERS_FILE
from twotower_lit.export.format import save_export
from twotower_lit.model import FeatureSpec, TwoTower


def unsharded_model(state: Mapping[str, torch.Tensor], features: Sequence[FeatureSpec],
                    model_cfg: ModelConfig) -> TwoTower:
    """A CPU TwoTower holding a gathered state dict (for export and single-process scoring)."""
    model = TwoTower(features, model_cfg.embedding_dim, model_cfg.user_layers, model_cfg.item_layers,
                     exposure_dims=model_cfg.exposure_dims)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.no_grad()
def item_vectors(model: TwoTower, dm: MovieLensDataModule, batch_size: int = 8192) -> torch.Tensor:
    """Item-tower output of every item index (row 0: the out-of-vocabulary item)."""
    ids = np.arange(dm.num_items, dtype=np.int64)
    out = []
    for lo in range(0, len(ids), batch_size):
        part = ids[lo:lo + batch_size]
        out.append(model(dm.builder.build(np.zeros_like(part), part))[1])
    return torch.cat(out)


def export_model(model_dir: str, state: Mapping[str, torch.Tensor], features: Sequence[FeatureSpec],
                 model_cfg: ModelConfig, dm: MovieLensDataModule, metrics: Mapping,
                 extra_config: Optional[Dict] = None) -> Dict:
    """Write `model_dir` (see `twotower_lit.export.format`); returns its manifest."""
    dm.load()
    model = unsharded_model(state, features, model_cfg)
    user_features = [f.name for f in features if f.tower == "user"]
    tensors = {
        "item.vectors": item_vectors(model, dm)[1:].contiguous(),
        "item.popularity": torch.from_numpy(
            np.bincount(dm.splits["train"]["item"], weights=dm.splits["train"]["label"],
                        minlength=dm.num_items)[1:].astype(np.float32)),
        "user.features": torch.from_numpy(np.stack([dm.tables.user[n] for n in user_features], axis=1)),
        "seen.indptr": torch.from_numpy(dm.seen.indptr),
        "seen.items": torch.from_numpy(dm.seen.indices),
    }
    for name in user_features:
        tensors[f"user.emb.{name}.weight"] = model.ebc.embedding_bags[f"t_{name}"].weight.detach().clone()
    for key, value in model.user_tower.state_dict().items():
        tensors[f"user.mlp.{key}"] = value.detach().clone()

    manifest = dm.manifest
    users = read_columns(join(dm.data_dir, USERS_FILE), ["user", "user_id"])
    user_ids = [0] * dm.num_users
    for idx, raw in zip(users.column("user").to_pylist(), users.column("user_id").to_pylist()):
        user_ids[idx] = int(raw)
    item_cols = ["item", "item_id", "title"] + (["genres"] if "genres" in manifest["item_features"] else [])
    items_table = read_columns(join(dm.data_dir, ITEMS_FILE), item_cols).sort_by("item")
    genre_names = manifest.get("vocab", {}).get("genres", [])
    items = [None] * (dm.num_items - 1)
    for row in items_table.to_pylist():
        items[row["item"] - 1] = {"id": int(row["item_id"]), "title": row["title"] or "",
                                  "genres": [genre_names[g - 1] for g in (row.get("genres") or []) if g > 0]}
    missing = [i + 1 for i, it in enumerate(items) if it is None]
    if missing:
        raise ValueError(f"{ITEMS_FILE} lacks item indices {missing[:5]}...; prepare the data again")
    config = {
        "embedding_dim": model_cfg.embedding_dim,
        "user_features": user_features,
        "item_features": [f.name for f in features if f.tower == "item"],
        "user_layers": list(model_cfg.user_layers),
        "item_layers": list(model_cfg.item_layers),
        "exposure_dims": model_cfg.exposure_dims,  # the liking logit leaves out the vectors' last ones
        "vocab_sizes": {f.name: f.num_embeddings for f in features},
        "zip_prefix": manifest.get("options", {}).get("zip_prefix", 3),
        "dataset": manifest.get("dataset"),
        "threshold": manifest.get("options", {}).get("threshold", 4.0),
        **(extra_config or {}),
    }
    return save_export(model_dir, config, tensors, user_ids, items, manifest.get("vocab", {}), metrics)
