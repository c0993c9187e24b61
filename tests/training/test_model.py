"""The two towers' inputs: each tower reads its own features' pooled columns from the embedding
collection's output, whatever order the (sharded) collection returns them in."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchrec.sparse.jagged_tensor import KeyedTensor


def _batch(specs, rows: int, genre_lengths):
    """A feature batch: one id per row for single-valued features, `genre_lengths` ids for genres."""
    from twotower_lit.data.batches import keyed_features

    g = torch.Generator().manual_seed(1)
    values, lengths = [], []
    for s in specs:
        n = torch.tensor(genre_lengths if s.pooling == "mean" else [1] * rows, dtype=torch.int32)
        values.append(torch.randint(1, s.num_embeddings, (int(n.sum()),), generator=g))
        lengths.append(n)
    return keyed_features([s.name for s in specs], values, lengths)


@pytest.mark.parametrize("order", ["features", "reversed"])
def test_towers_read_their_features_whatever_the_embedding_output_order(prepared_synthetic, order):
    """A sharded collection may return its features grouped by rank instead of in feature order;
    the towers slice the pooled output by key, so each still gets its features, in its order, and
    the genres columns (sums) are divided by each row's number of genres."""
    import json

    from twotower_lit.model import TwoTower, feature_specs, tower_inputs

    torch.manual_seed(0)
    specs = feature_specs(json.loads((prepared_synthetic / "manifest.json").read_text()))
    assert [s.name for s in specs if s.pooling == "mean"] == ["genres"]
    model = TwoTower(specs, 4, [8, 4], [8, 4])
    genre_lengths = [2, 1, 0, 3, 1]
    rows = len(genre_lengths)
    features = _batch(specs, rows, genre_lengths)
    pooled = {s.name: torch.randn(rows, 4) for s in specs}
    mean = {n: v / torch.tensor(genre_lengths).clamp(min=1).unsqueeze(1) if n == "genres" else v
            for n, v in pooled.items()}
    user_expected = model.user_tower(torch.cat([mean[n] for n in model.user_features], 1))
    item_expected = model.item_tower(torch.cat([mean[n] for n in model.item_features], 1))
    keys = [s.name for s in specs][::-1 if order == "reversed" else 1]
    kt = KeyedTensor.from_tensor_list(keys, [pooled[k] for k in keys])
    user_in, item_in = tower_inputs(kt, features, model.user_features, model.item_features, model.mean_features)
    assert user_in._base is (kt.values() if order == "features" else None)  # no copy when in order
    np.testing.assert_allclose(model.user_tower(user_in).detach().numpy(), user_expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.item_tower(item_in).detach().numpy(), item_expected.detach().numpy(), rtol=1e-6)
    with pytest.raises(KeyError, match="lacks features"):
        tower_inputs(KeyedTensor.from_tensor_list(keys[1:], [pooled[k] for k in keys[1:]]), features,
                     model.user_features, model.item_features, model.mean_features)
    with pytest.raises(ValueError, match="bag lengths"):
        tower_inputs(kt, None, model.user_features, model.item_features, model.mean_features)


def test_one_pooling_type_gives_mean_pooled_genres(prepared_synthetic):
    """Every table is sum-pooled (one fbgemm lookup group), and the model's tower inputs equal
    what per-feature `nn.EmbeddingBag`s give with genres mean-pooled, including a movie with no
    genres (a zero vector, as mean pooling gives)."""
    import json

    from torchrec.modules.embedding_configs import PoolingType

    from twotower_lit.model import TwoTower, feature_specs, tower_inputs

    torch.manual_seed(0)
    specs = feature_specs(json.loads((prepared_synthetic / "manifest.json").read_text()))
    model = TwoTower(specs, 4, [8, 4], [8, 4])
    assert {c.pooling for c in model.ebc.embedding_bag_configs()} == {PoolingType.SUM}
    genre_lengths = [2, 1, 0, 3, 1, 2]
    features = _batch(specs, len(genre_lengths), genre_lengths)
    user_in, item_in = tower_inputs(model.ebc(features), features, model.user_features, model.item_features,
                                    model.mean_features)
    weights = {s.name: model.ebc.embedding_bags[s.table].weight for s in specs}
    bags = {s.name: nn.EmbeddingBag.from_pretrained(weights[s.name].detach().clone(), mode=s.pooling, freeze=False)
            for s in specs}
    reference = {s.name: bags[s.name](features[s.name].values(), features[s.name].offsets()[:-1]) for s in specs}
    assert reference["genres"][2].abs().sum() == 0
    user_ref = torch.cat([reference[n] for n in model.user_features], 1)
    item_ref = torch.cat([reference[n] for n in model.item_features], 1)
    np.testing.assert_allclose(user_in.detach().numpy(), user_ref.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(item_in.detach().numpy(), item_ref.detach().numpy(), rtol=1e-6)
    # and the same gradients reach the tables
    target = torch.randn_like(item_in)
    ((user_in ** 2).sum() + (item_in * target).sum()).backward()
    ((user_ref ** 2).sum() + (item_ref * target).sum()).backward()
    for s in specs:
        np.testing.assert_allclose(weights[s.name].grad.numpy(), bags[s.name].weight.grad.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=s.name)


def test_exposure_dims_must_leave_the_liking_logit_a_dimension():
    from twotower_lit.model import FeatureSpec, TwoTower

    specs = [FeatureSpec("user", 5, "user"), FeatureSpec("item", 5, "item")]
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="--exposure-dims"):
            TwoTower(specs, 4, [16, 8], [16, 8], exposure_dims=bad)
    assert TwoTower(specs, 4, [16, 8], [16, 8], exposure_dims=7).exposure_dims == 7
