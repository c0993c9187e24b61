"""How the replicated parameters (towers, data_parallel tables) stay equal across ranks: two gloo
processes train the same sharded model with `GradientAverager` (``--gradient-sync allreduce``)
and with TorchRec's DDP wrappers (``ddp``), and must end with the same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.conftest import free_port
from tests.ranks import run_ranks

WORLD = 2
STEPS = 6


def _build(dm, gradient_sync: str, seed: int):
    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.model import feature_specs
    from twotower_lit.distributed.sharding import shard_module
    from twotower_lit.training.module import TwoTowerModule

    torch.manual_seed(seed)
    cfg = ModelConfig(embedding_dim=8, user_layers=[16, 8], item_layers=[16, 8], exposure_dims=0)
    lm = TwoTowerModule(feature_specs(dm.manifest), cfg, OptimConfig(embedding_optimizer="rowwise_adagrad"), STEPS)
    pg = dist.group.WORLD
    # two tables replicated (dense kernel, averaged gradients), the others sharded (fused optimizer)
    shard_module(lm, pg, torch.device("cpu"), {"user": "data_parallel", "genres": "data_parallel"},
                 default="table_wise", gradient_sync=gradient_sync)
    return lm, lm.configure_optimizers()["optimizer"]


def _replicated_lookups(model):
    """The lookups of the data_parallel tables in the model's sharded collection."""
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec.distributed.sharding.dp_sharding import DpPooledEmbeddingSharding

    return [lookup for sub in model.modules() if isinstance(sub, ShardedEmbeddingBagCollection)
            for lookup, sharding in zip(sub._lookups, sub._embedding_shardings)
            if isinstance(sharding, DpPooledEmbeddingSharding)]


def _weights(lm):
    """{name: this rank's values}, under the same names with or without the DDP wrapper."""
    out = {}
    for name, value in lm.model.state_dict().items():
        if hasattr(value, "local_shards"):  # a sharded table: this rank's part, if any
            shards = value.local_shards()
            if not shards:
                continue
            value = torch.cat([s.tensor.reshape(-1) for s in shards])
        out[name] = value.detach().clone()
    return out


def _train(lm, opt, dm, rank):
    train = dm.splits["train"]
    rng = np.random.default_rng(rank)  # each rank its own rows
    for _ in range(STEPS):
        idx = rng.integers(0, len(train["user"]), 128)
        batch = dm.builder.batch(train["user"][idx].astype(np.int64), train["item"][idx].astype(np.int64),
                                 train["label"][idx])
        loss = F.binary_cross_entropy_with_logits(lm(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, data_dir: str) -> None:
    from twotower_lit.data.datamodule import MovieLensDataModule
    from twotower_lit.distributed.sharding import GradientAverager

    dm = MovieLensDataModule(data_dir, batch_size=128)
    dm.load()
    # every rank seeds differently: the replicas start equal only because rank 0's values are copied
    averaged, averaged_opt = _build(dm, "allreduce", seed=10 + rank)
    reference, reference_opt = _build(dm, "ddp", seed=10 + rank)
    averager = averaged.model.gradient_averager
    assert isinstance(averager, GradientAverager)
    # the averager covers the towers and the replicated tables' lookups, taken out of their DDP
    towers = {name: p for name, p in averaged.model.named_parameters() if "tower" in name}
    replicated_lookups = _replicated_lookups(averaged.model)
    assert len(replicated_lookups) == 1  # both data_parallel tables in one lookup
    expected = list(towers.values()) + [p for lookup in replicated_lookups for p in lookup.parameters()]
    assert {id(p) for group in averager.groups for p in group} == {id(p) for p in expected}
    replicated = [*towers, "ebc.embedding_bags.t_user.weight", "ebc.embedding_bags.t_genres.weight"]
    assert not any(isinstance(m, DDP) for m in [*averaged.model.modules(), *replicated_lookups])
    assert all(isinstance(m, DDP) for m in _replicated_lookups(reference.model))
    assert any(isinstance(m, DDP) for m in reference.model.modules())

    start = _weights(averaged)
    assert start.keys() == _weights(reference).keys()
    for name, value in _weights(reference).items():
        torch.testing.assert_close(start[name], value, rtol=0, atol=0, msg=name)

    _train(averaged, averaged_opt, dm, rank)
    _train(reference, reference_opt, dm, rank)
    got, want = _weights(averaged), _weights(reference)
    moved = 0
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(value, start[name])
    assert moved == len(want), "every tensor trained"
    # the replicated parameters are equal on both ranks, bit for bit
    for name in replicated:
        value = dict(averaged.model.named_parameters())[name].detach()
        gathered = [torch.empty_like(value) for _ in range(WORLD)]
        dist.all_gather(gathered, value)
        assert torch.equal(gathered[0], gathered[1]), name


def test_one_allreduce_per_step_trains_two_ranks_as_ddp_does(prepared_synthetic, tmp_path):
    run_ranks(_worker, WORLD, tmp_path, str(prepared_synthetic))


def test_a_parameter_without_gradient_counts_as_zeros():
    """One process (gloo over one rank): the averager's callback runs once after backward and
    gives a gradient to a parameter the loss did not use, as DDP with find_unused_parameters does."""
    from twotower_lit.distributed.sharding import GradientAverager

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        used, unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        params = list(used.parameters()) + list(unused.parameters())
        averager = GradientAverager(params, dist.group.WORLD)
        x = torch.randn(4, 3)
        expected = torch.autograd.grad(used(x).square().sum(), list(used.parameters()))
        used(x).square().sum().backward()
        for p, g in zip(used.parameters(), expected):
            torch.testing.assert_close(p.grad, g)
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in unused.parameters())

        # a backward pass that fails after a gradient arrived (its callback never runs) does not
        # keep the next pass from averaging
        class Fails(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.clone()

            @staticmethod
            def backward(ctx, g):
                raise RuntimeError("failed in backward")

        for p in params:
            p.grad = None
        early = Fails.apply(torch.randn(4, requires_grad=True) * 2)  # created first: its backward runs last
        with pytest.raises(RuntimeError, match="failed in backward"):
            (used(x).sum() + early.sum()).backward()
        assert all(p.grad is None for p in unused.parameters())  # the callback did not run
        used(x).sum().backward()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in unused.parameters())

        averager.remove()
        for p in params:
            p.grad = None
        used(x).sum().backward()
        assert all(p.grad is None for p in unused.parameters())  # hooks removed: no callback
    finally:
        dist.destroy_process_group()


def _precision_worker(rank: int) -> None:
    from twotower_lit.distributed.sharding import GradientAverager

    base = torch.randn(GradientAverager.IN_PLACE_NUMEL + 5, generator=torch.Generator().manual_seed(0))
    large, small = torch.nn.Parameter(torch.zeros_like(base)), torch.nn.Parameter(torch.zeros(3))
    for dtype in (None, torch.bfloat16):
        averager = GradientAverager([large, small], dist.group.WORLD, dtype)
        produced = []  # the tensor autograd accumulated, seen before the averager's callback
        hook = large.register_post_accumulate_grad_hook(lambda p: produced.append(p.grad.data_ptr()))
        # rank r's gradients are (r + 1) x base: their mean is 1.5 x base
        ((large * base).sum() * (rank + 1) + (small * base[:3]).sum() * (rank + 1)).backward()
        want = 1.5 * base if dtype is None else \
            (base.to(dtype) + (2 * base).to(dtype)).to(torch.float32) / 2  # sent and summed as bf16
        tol = {} if dtype is None else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(large.grad, want, **tol)
        torch.testing.assert_close(small.grad, want[:3], **tol)
        assert large.grad.data_ptr() == produced[0], "the large gradient is averaged where it is"
        as_bf16 = large.grad.to(torch.bfloat16).to(torch.float32)
        assert torch.equal(as_bf16, large.grad) == (dtype is not None), "averaged in bf16 only when asked"
        for grad in (large.grad, small.grad):
            gathered = [torch.empty_like(grad) for _ in range(WORLD)]
            dist.all_gather(gathered, grad)
            assert torch.equal(gathered[0], gathered[1])
        hook.remove()
        averager.remove()
        large.grad = small.grad = None


def test_large_gradients_are_averaged_in_place_and_bf16_sends_half_the_bytes(tmp_path):
    """A gradient of at least IN_PLACE_NUMEL elements (the replicated tables' fused weight) is
    all-reduced where autograd left it; the others through one flat buffer. With bf16 both are
    sent and summed as bfloat16: the result is that sum's, equal on both ranks."""
    run_ranks(_precision_worker, WORLD, tmp_path)
