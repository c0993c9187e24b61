"""The two towers' inputs: each tower reads its own features' pooled columns from the embedding
collection's output, whatever order the (sharded) collection returns them in."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor


@pytest.mark.parametrize("order", ["features", "reversed"])
def test_towers_read_their_features_whatever_the_embedding_output_order(prepared_synthetic, order):
    """A sharded collection may return its features grouped by rank instead of in feature order;
    the towers slice the pooled output by key, so each still gets its features, in its order."""
    import json

    from twotower_lit.model import TwoTower, feature_specs, tower_inputs

    torch.manual_seed(0)
    specs = feature_specs(json.loads((prepared_synthetic / "manifest.json").read_text()))
    model = TwoTower(specs, 4, [8, 4], [8, 4])
    rows = 5
    pooled = {s.name: torch.randn(rows, 4) for s in specs}
    user_expected = model.user_tower(torch.cat([pooled[n] for n in model.user_features], 1))
    item_expected = model.item_tower(torch.cat([pooled[n] for n in model.item_features], 1))
    keys = [s.name for s in specs][::-1 if order == "reversed" else 1]
    kt = KeyedTensor.from_tensor_list(keys, [pooled[k] for k in keys])
    user_in, item_in = tower_inputs(kt, tuple(model.user_features), tuple(model.item_features))
    assert user_in._base is (kt.values() if order == "features" else None)  # no copy when in order
    np.testing.assert_allclose(model.user_tower(user_in).detach().numpy(), user_expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.item_tower(item_in).detach().numpy(), item_expected.detach().numpy(), rtol=1e-6)
    with pytest.raises(KeyError, match="lacks features"):
        tower_inputs(KeyedTensor.from_tensor_list(keys[1:], [pooled[k] for k in keys[1:]]),
                     tuple(model.user_features), tuple(model.item_features))


def test_train_pipeline_can_trace_the_model():
    """TorchRec's train pipeline finds the embedding collection by tracing the model with
    torch.fx: the forward must stay traceable (the tower inputs are one opaque call)."""
    from torchrec.distributed.train_pipeline.utils import Tracer

    from twotower_lit.model import FeatureSpec, TwoTower

    specs = [FeatureSpec("user", 10, "user"), FeatureSpec("age", 4, "user"), FeatureSpec("item", 12, "item")]
    model = TwoTower(specs, 4, [8, 4], [8, 4], device=torch.device("meta"))
    graph = Tracer(leaf_modules=["ebc"]).trace(model)  # as the pipeline marks its sharded modules
    targets = [str(n.target) for n in graph.nodes]
    assert "ebc" in targets and "tower_inputs" in " ".join(targets)
