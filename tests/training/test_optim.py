"""`GroupedRowWiseAdagrad` against TorchRec's `RowWiseAdagrad`, which it must reproduce."""
from __future__ import annotations

import copy

import pytest
import torch
from torchrec.optim import RowWiseAdagrad

from twotower_lit.optim import GroupedRowWiseAdagrad

SHAPES = [(50, 8), (7, 8), (30, 4), (1, 8), (12, 4)]  # two widths, stepped as two blocks


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in SHAPES]


@pytest.mark.parametrize("options", [
    {"lr": 0.1},
    {"lr": 0.05, "weight_decay": 0.01, "eps": 1e-6},
    {"lr": 0.2, "lr_decay": 0.1, "initial_accumulator_value": 0.5},
    {"lr": 0.1, "maximize": True},
])
def test_same_updates_and_state_as_torchrecs_rowwise_adagrad(options):
    ours, theirs = _params(0), _params(0)
    grouped, reference = GroupedRowWiseAdagrad(ours, **options), RowWiseAdagrad(theirs, **options)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if step == 2 and i == 1:  # a table without a gradient this step is left alone
                a.grad = b.grad = None
                continue
            grad = torch.randn(a.shape, generator=g) * (torch.rand(a.shape[0], 1, generator=g) < 0.5)  # some rows 0
            a.grad, b.grad = grad.clone(), grad.clone()
        grouped.step()
        reference.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b, start in zip(ours, theirs, _params(0)):
        assert not torch.equal(a, start)
        torch.testing.assert_close(grouped.state[a]["sum"], reference.state[b]["sum"])
        assert grouped.state[a]["step"].item() == reference.state[b]["step"].item()
    assert grouped.state[ours[1]]["step"].item() == 5  # skipped once


def test_checkpoints_move_between_the_two_classes():
    """The state dict has TorchRec's layout: a checkpoint of one class resumes in the other."""
    ours, theirs = _params(3), _params(3)
    reference = RowWiseAdagrad(theirs, lr=0.1, lr_decay=0.05)
    g = torch.Generator().manual_seed(4)
    grads = [[torch.randn(p.shape, generator=g) for p in theirs] for _ in range(4)]
    for step in grads[:2]:
        for p, grad in zip(theirs, step):
            p.grad = grad.clone()
        reference.step()
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    grouped = GroupedRowWiseAdagrad(ours, lr=0.1, lr_decay=0.05)
    grouped.load_state_dict(copy.deepcopy(reference.state_dict()))  # (a state dict holds the live tensors)
    for step in grads[2:]:
        for a, b, grad in zip(ours, theirs, step):
            a.grad, b.grad = grad.clone(), grad.clone()
        grouped.step()
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert set(grouped.state_dict()["state"][0]) == set(reference.state_dict()["state"][0]) == {"step", "sum"}


def test_sparse_gradients_are_refused():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        GroupedRowWiseAdagrad([p]).step()


def _fused_tables(seed: int, shapes):
    """Tables as a data_parallel lookup holds them: TorchRec slices of one flat fused weight."""
    from torchrec.distributed.batched_embedding_kernel import TableBatchedEmbeddingSlice

    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Parameter(torch.randn(sum(r * d for r, d in shapes), generator=g))
    tables, start = [], 0
    for rows, dim in shapes:
        tables.append(TableBatchedEmbeddingSlice(base, start, start + rows * dim, rows, dim))
        start += rows * dim
    return base, tables


@pytest.mark.parametrize("shapes", [
    [(50, 8), (7, 8), (1, 8), (12, 8)],  # one width: one block, the whole fused weight
    [(50, 8)],  # one table
    [(30, 4), (50, 8), (7, 8)],  # the width-8 block starts inside the fused weight
    SHAPES,  # a width's tables not adjacent: stepped table by table
])
@pytest.mark.parametrize("options", [
    {"lr": 0.1},
    {"lr": 0.05, "weight_decay": 0.01, "eps": 1e-6},
    {"lr": 0.2, "lr_decay": 0.1, "initial_accumulator_value": 0.5},
    {"lr": 0.1, "maximize": True},
])
def test_slices_of_one_fused_weight_get_torchrecs_rowwise_adagrad_updates(shapes, options):
    """Tables of a data_parallel lookup (views of one fused weight, whose gradient is one tensor)
    are stepped on that weight: the same weights and state as TorchRec's optimizer on separate
    tables, and a checkpoint of either class resumes in the other."""
    base, ours = _fused_tables(0, shapes)
    theirs = [torch.nn.Parameter(t.detach().clone()) for t in ours]
    grouped, reference = GroupedRowWiseAdagrad(ours, **options), RowWiseAdagrad(theirs, **options)
    g = torch.Generator().manual_seed(1)

    def step(optimizers):
        grad = torch.randn(base.shape, generator=g)
        grad[torch.rand(base.shape, generator=g) < 0.5] = 0
        base.grad = grad
        for t, p in zip(ours, theirs):
            p.grad = t.grad.clone()  # the table's slice of the fused gradient
        for optimizer in optimizers:
            optimizer.step()

    for _ in range(4):
        step((grouped, reference))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grouped.state[a]["sum"], reference.state[b]["sum"])
        assert grouped.state[a]["step"].item() == reference.state[b]["step"].item() == 4
    if shapes != SHAPES:  # each width's tables adjacent: their accumulators are views of one tensor
        for width in {d for _, d in shapes}:
            sums = [grouped.state[t]["sum"] for t in ours if t.shape[1] == width]
            assert all(s._base is not None and s._base is sums[0]._base for s in sums)

    # TorchRec's optimizer resumes from ours, and ours (new tensors per table) from TorchRec's
    reference = RowWiseAdagrad(theirs, **options)
    reference.load_state_dict(copy.deepcopy(grouped.state_dict()))
    grouped = GroupedRowWiseAdagrad(ours, **options)
    grouped.load_state_dict(copy.deepcopy(reference.state_dict()))
    for _ in range(3):
        step((grouped, reference))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grouped.state[a]["sum"], reference.state[b]["sum"])
    assert grouped.state[ours[0]]["step"].item() == 7
