"""`--compile`: the towers and the training loss through torch.compile, on a real one-process
DistributedModelParallel model (gloo), against the same model run eagerly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedTensor

from tests.conftest import free_port
from tests.training.test_optimizers import _batches


@pytest.fixture(scope="module")
def process_group():
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def data(prepared_synthetic):
    from twotower_lit.data.datamodule import MovieLensDataModule

    dm = MovieLensDataModule(str(prepared_synthetic), batch_size=256)
    dm.load()
    return dm


def _module(dm, pg, compile: str):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.losses import TwoTowerLoss
    from twotower_lit.model import feature_specs
    from twotower_lit.module import TwoTowerModule
    from twotower_lit.strategy import EmbeddingBagCollectionShardingOffer, build_sharding_plan

    torch.manual_seed(0)
    # the training job's default objective: rated-pair BCE + in-batch softmax + vector L2
    loss = TwoTowerLoss("both", num_items=dm.num_items, softmax_weight=0.22, temperature=0.5, vector_l2=3e-3)
    loss.set_item_counts(dm.item_counts)
    lm = TwoTowerModule(feature_specs(dm.manifest), ModelConfig(embedding_dim=8, user_layers=[16, 8],
                                                                item_layers=[16, 8]), OptimConfig(), loss=loss,
                        compile=compile)
    plan = build_sharding_plan(lm.model, pg, "cpu", "table_wise")
    lm.model = DistributedModelParallel(lm.model, device=torch.device("cpu"), plan=plan,
                                        sharders=[EmbeddingBagCollectionShardingOffer()],
                                        env=ShardingEnv.from_process_group(pg))
    return lm


def _train(lm, batches):
    opt = lm.configure_optimizers()["optimizer"]
    losses = []
    for b in batches:
        loss, _ = lm.loss_and_output(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_compiled_towers_and_loss_train_like_eager(process_group, data):
    from torch._dynamo.utils import counters

    batches = list(_batches(data, 6))
    eager = _module(data, process_group, "off")
    eager_losses = _train(eager, batches)
    torch._dynamo.reset()
    counters.clear()
    compiled = _module(data, process_group, "default")
    compiled_losses = _train(compiled, batches)
    # both the towers (inside DMP's forward) and the loss went through the compiler, forward and backward
    assert counters["stats"]["unique_graphs"] >= 2
    assert counters["aot_autograd"]["total"] >= 2
    # the same training: same losses step after step (the updates of step k feed step k + 1)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert eager_losses[-1] < eager_losses[0]
    # evaluation runs the eager towers (other batch sizes, no recompilation) with the trained weights
    with torch.no_grad():
        z_eager, z_compiled = eager(batches[0]), compiled(batches[0])
    assert z_compiled.numpy() == pytest.approx(z_eager.numpy(), rel=1e-3, abs=1e-5)


def test_unknown_compile_mode_is_refused(data):
    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.model import feature_specs
    from twotower_lit.module import TwoTowerModule

    with pytest.raises(ValueError, match="compile must be one of off, default"):
        TwoTowerModule(feature_specs(data.manifest), ModelConfig(), OptimConfig(), compile="fast")


@pytest.mark.parametrize("order", ["features", "reversed"])
def test_towers_read_their_features_whatever_the_embedding_output_order(data, order):
    """The towers slice the pooled output by key, so a sharded collection that returns its
    features in another order (tables grouped by rank) still feeds each tower its own features."""
    from twotower_lit.model import TwoTower, feature_specs, tower_inputs

    torch.manual_seed(0)
    specs = feature_specs(data.manifest)
    model = TwoTower(specs, 4, [8, 4], [8, 4])
    rows = 5
    pooled = {s.name: torch.randn(rows, 4) for s in specs}
    user_expected = model.user_tower(torch.cat([pooled[n] for n in model.user_features], 1))
    item_expected = model.item_tower(torch.cat([pooled[n] for n in model.item_features], 1))
    keys = [s.name for s in specs][::-1 if order == "reversed" else 1]
    kt = KeyedTensor.from_tensor_list(keys, [pooled[k] for k in keys])
    user_in, item_in = tower_inputs(kt, tuple(model.user_features), tuple(model.item_features))
    assert user_in._base is (kt.values() if order == "features" else None)  # a view when in order
    user, item = model.towers(user_in, item_in)
    np.testing.assert_allclose(user.detach().numpy(), user_expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(item.detach().numpy(), item_expected.detach().numpy(), rtol=1e-6)
    with pytest.raises(KeyError, match="lacks features"):
        tower_inputs(KeyedTensor.from_tensor_list(keys[1:], [pooled[k] for k in keys[1:]]),
                     tuple(model.user_features), tuple(model.item_features))
