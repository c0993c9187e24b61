"""The two-tower model: TorchRec embedding tables feeding a user tower and an item tower.

The model is plain `nn.Module` code with no knowledge of distribution: the TorchRec strategy
shards its `EmbeddingBagCollection` (``ebc``) and data-parallelises the towers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_lit.data.schema import MULTI_VALUED
from twotower_lit.layers import mlp


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse feature: its table size and which tower reads it."""

    name: str
    num_embeddings: int
    tower: str  # "user" or "item"

    @property
    def table(self) -> str:
        return f"t_{self.name}"

    @property
    def pooling(self) -> str:
        # multi-valued features (genres) are averaged so the bag size does not scale the vector
        return "mean" if self.name in MULTI_VALUED else "sum"


def feature_specs(manifest: Mapping, side_features: bool = True) -> List[FeatureSpec]:
    """Feature list of a prepared dataset: ids always, side features when asked and present."""
    sizes = manifest["vocab_sizes"]
    specs = []
    for tower, key, id_name in (("user", "user_features", "user"), ("item", "item_features", "item")):
        for name in manifest[key]:
            if name == id_name or side_features:
                specs.append(FeatureSpec(name=name, num_embeddings=int(sizes[name]), tower=tower))
    return specs


class TwoTower(nn.Module):
    """score(user, item) = <user_tower(user features), item_tower(item features)>.

    Input is one `KeyedJaggedTensor` with every feature (user features first, then item
    features, in `self.feature_names` order); `forward` returns the two tower outputs.
    """

    def __init__(self, features: Sequence[FeatureSpec], embedding_dim: int, user_layers: Sequence[int],
                 item_layers: Sequence[int], device: Optional[torch.device] = None) -> None:
        super().__init__()
        if user_layers[-1] != item_layers[-1]:
            raise ValueError(f"the towers must end in the same width to take a dot product: "
                             f"user_layers={list(user_layers)}, item_layers={list(item_layers)}")
        self.features = list(features)
        self.user_features = [f.name for f in features if f.tower == "user"]
        self.item_features = [f.name for f in features if f.tower == "item"]
        self.feature_names = self.user_features + self.item_features
        self.embedding_dim = embedding_dim
        tables = [
            EmbeddingBagConfig(name=f.table, embedding_dim=embedding_dim, num_embeddings=f.num_embeddings,
                               feature_names=[f.name],
                               pooling=PoolingType.MEAN if f.pooling == "mean" else PoolingType.SUM)
            for f in features
        ]
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self.user_tower = mlp(embedding_dim * len(self.user_features), user_layers)
        self.item_tower = mlp(embedding_dim * len(self.item_features), item_layers)

    def forward(self, features: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = self.ebc(features).to_dict()
        user = torch.cat([pooled[n] for n in self.user_features], dim=1)
        item = torch.cat([pooled[n] for n in self.item_features], dim=1)
        return self.user_tower(user), self.item_tower(item)


def logits(user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    return (user * item).sum(dim=1)
