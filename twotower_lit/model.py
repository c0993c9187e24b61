"""The two-tower model: TorchRec embedding tables feeding a user tower and an item tower.

The model is plain `nn.Module` code with no knowledge of distribution: the TorchRec strategy
shards its `EmbeddingBagCollection` (``ebc``) and data-parallelises the towers.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from twotower_lit.data.schema import MULTI_VALUED
from twotower_lit.layers import mlp

Spans = Tuple[Tuple[int, int], ...]  # column ranges [lo, hi) of a tensor


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

    The retrieval score is the whole dot product; the liking logit (`twotower_lit.layers.logits`,
    trained by the BCE term and measured by AUC) leaves out the last ``exposure_dims`` dimensions.
    Those model which movies a user rates at all, which the in-batch softmax learns and which
    differs from whether the user likes a movie once rated: with one score, each objective pulled
    it its own way.

    Input is one `KeyedJaggedTensor` with every feature (user features first, then item
    features, in `self.feature_names` order); `forward` returns the two tower outputs.

    Every table is sum-pooled, mean-pooled features (genres) included: TorchRec runs one fbgemm
    kernel group per pooling type, so a single pooling type means one embedding lookup (forward,
    backward and fused optimizer) per step instead of two, and the sharded collection's feature
    order is the input's, so it skips its per-step permute of the input. The mean is taken in
    `tower_inputs`, which divides those features' sums by their bag lengths.
    """

    def __init__(self, features: Sequence[FeatureSpec], embedding_dim: int, user_layers: Sequence[int],
                 item_layers: Sequence[int], device: Optional[torch.device] = None, exposure_dims: int = 0) -> None:
        super().__init__()
        if user_layers[-1] != item_layers[-1]:
            raise ValueError(f"the towers must end in the same width to take a dot product: "
                             f"user_layers={list(user_layers)}, item_layers={list(item_layers)}")
        if not 0 <= exposure_dims < user_layers[-1]:
            raise ValueError(f"--exposure-dims {exposure_dims} must be >= 0 and below the towers' output width "
                             f"{user_layers[-1]} (the liking logit needs at least one dimension): pass "
                             f"--exposure-dims 0 to {user_layers[-1] - 1}, or wider towers")
        self.exposure_dims = exposure_dims
        self.features = list(features)
        self.user_features = tuple(f.name for f in features if f.tower == "user")
        self.item_features = tuple(f.name for f in features if f.tower == "item")
        self.mean_features = tuple(f.name for f in features if f.pooling == "mean")
        self.feature_names = list(self.user_features + self.item_features)
        self.embedding_dim = embedding_dim
        tables = [
            EmbeddingBagConfig(name=f.table, embedding_dim=embedding_dim, num_embeddings=f.num_embeddings,
                               feature_names=[f.name], pooling=PoolingType.SUM)
            for f in features
        ]
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self.user_tower = mlp(embedding_dim * len(self.user_features), user_layers)
        self.item_tower = mlp(embedding_dim * len(self.item_features), item_layers)

    def forward(self, features: KeyedJaggedTensor, bag_lengths: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(user tower output, item tower output) per row. `bag_lengths` (keys x rows): what the
        averaged features' sums are divided by, when not the features' own lengths (a batch padded
        with zero-vector values, `twotower_lit.graphs`)."""
        user, item = tower_inputs(self.ebc(features), features, self.user_features, self.item_features,
                                  self.mean_features, bag_lengths)
        return self.user_tower(user), self.item_tower(item)


def tower_inputs(pooled: KeyedTensor, features: Optional[KeyedJaggedTensor], user_features: Tuple[str, ...],
                 item_features: Tuple[str, ...], mean_features: Tuple[str, ...] = (),
                 bag_lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(user tower input, item tower input): each tower's features' pooled columns, in its feature
    order, without ``to_dict`` + two concatenations on every step.

    In the usual key order (the user features, then the item features) the two inputs are the two
    parts of one split of the pooled output: views, whose backward is one concatenation (column
    slices would each build a zero tensor of the whole output and add them up). In any other order
    (a sharded collection may group its output by rank) each tower's columns are gathered.

    `pooled` holds sums; the columns of `mean_features` are divided by their bag lengths in
    `features` (the batch that was pooled; an empty bag stays 0, as with mean pooling), or by
    `bag_lengths` (keys x rows) when given.
    """
    values = pooled.values()
    layout = _tower_layout(tuple(pooled.keys()), tuple(pooled.length_per_key()), user_features, item_features,
                           mean_features)
    if layout.split is not None:
        user, item = values.split(layout.split, dim=1)
    else:
        user, item = _columns(values, layout.user), _columns(values, layout.item)
    if layout.user_means or layout.item_means:
        if features is None:
            raise ValueError(f"averaging {list(mean_features)} needs the batch's bag lengths: pass its features")
        if features.variable_stride_per_key():
            raise ValueError("batches with a different number of rows per feature are not supported")
        keys = features.keys()
        lengths = features.lengths().view(len(keys), -1) if bag_lengths is None else bag_lengths
        user = _averaged(user, lengths, keys, user_features, layout.user_means)
        item = _averaged(item, lengths, keys, item_features, layout.item_means)
    return user, item


@dataclass(frozen=True)
class _Layout:
    """Where each tower's features are in a pooled output."""

    split: Optional[Tuple[int, int]]  # (user columns, item columns) when they are the output's two parts, in order
    user: Spans  # column ranges of the user features, in tower order
    item: Spans
    user_means: Tuple[int, ...]  # positions (in tower order) of the user features to average
    item_means: Tuple[int, ...]


@functools.lru_cache(maxsize=64)
def _tower_layout(keys: Tuple[str, ...], widths: Tuple[int, ...], user_features: Tuple[str, ...],
                  item_features: Tuple[str, ...], mean_features: Tuple[str, ...] = ()) -> _Layout:
    """The layout of the user and of the item features in a pooled output with these keys, and
    which of each tower's features are averaged (computed once per key order, not per step)."""
    spans = {k: (lo, lo + w) for k, lo, w in zip(keys, itertools.accumulate((0,) + widths), widths)}
    missing = [n for n in user_features + item_features if n not in spans]
    if missing:
        raise KeyError(f"the embedding output lacks features {missing} (it has {list(keys)})")
    user, item = _merge(spans[n] for n in user_features), _merge(spans[n] for n in item_features)
    in_order = keys == user_features + item_features
    split = (user[0][1], item[0][1] - item[0][0]) if in_order else None
    means = []
    for names in (user_features, item_features):
        positions = tuple(j for j, n in enumerate(names) if n in mean_features)
        tower_widths = [spans[n][1] - spans[n][0] for n in names]
        if positions and len(set(tower_widths)) != 1:
            raise ValueError(f"averaged features need one embedding width per tower, got {tower_widths}")
        means.append(positions)
    return _Layout(split, user, item, *means)


def _merge(spans: Iterable[Tuple[int, int]]) -> Spans:
    """Adjacent column ranges joined: the usual key order gives one range per tower."""
    out: List[Tuple[int, int]] = []
    for lo, hi in spans:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def _columns(x: torch.Tensor, spans: Spans) -> torch.Tensor:
    """The columns of `x` in `spans`: a view when they are one range, else one concatenation."""
    if len(spans) == 1:
        lo, hi = spans[0]
        return x[:, lo:hi]
    return torch.cat([x[:, lo:hi] for lo, hi in spans], dim=1)


def _averaged(x: torch.Tensor, lengths: torch.Tensor, keys: List[str], names: Tuple[str, ...],
              means: Tuple[int, ...]) -> torch.Tensor:
    """Tower input `x` (the columns of features `names`, in order) with the sums of the features at
    positions `means` divided by their bag lengths (`lengths`: keys x rows of the pooled batch):
    one multiplication by a (rows, features) scale, 1 for the others."""
    if not means:
        return x
    scale = x.new_ones(x.shape[0], len(names))
    for j in means:
        scale[:, j] = lengths[keys.index(names[j])].clamp(min=1).reciprocal()
    return (x.view(x.shape[0], len(names), -1) * scale.unsqueeze(2)).view(x.shape)

