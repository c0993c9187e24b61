"""The softmax's candidates shared by every rank: two gloo processes train the softmax that one
process trains over both ranks' rows, gradients included."""
from __future__ import annotations

import numpy as np
import torch

from tests.ranks import run_ranks

WORLD, RATED, NEGATIVES, BLOCK, DIM, ITEMS = 2, 10, 2, 4, 6, 15


def _rows(seed: int = 0):
    """Every rank's rows: user and item vectors, item ids (repeats: accidental hits), labels."""
    g = torch.Generator().manual_seed(seed)
    rows = RATED * (1 + NEGATIVES)
    user = torch.randn(WORLD, rows, DIM, generator=g, dtype=torch.float64)
    item = torch.randn(WORLD, rows, DIM, generator=g, dtype=torch.float64)
    items = torch.randint(1, ITEMS, (WORLD, rows), generator=g)
    labels = torch.zeros(WORLD, rows, dtype=torch.float64)
    labels[:, :RATED] = (torch.rand(WORLD, RATED, generator=g) > 0.4).double()
    counts = np.random.default_rng(seed).integers(0, 50, ITEMS)
    return user, item, items, labels, counts


def _loss(world_rows: int, candidates=None):
    from twotower_lit.losses import TwoTowerLoss

    return TwoTowerLoss("softmax", num_items=ITEMS, negatives=NEGATIVES, temperature=0.5,
                        softmax_rows=world_rows, candidates=candidates).double()


def _one_process_layout(x: torch.Tensor) -> torch.Tensor:
    """Both ranks' rows as one process's batch whose blocks of WORLD x BLOCK rated rows hold
    block j of every rank (and their negatives likewise)."""
    full = RATED - RATED % BLOCK
    parts = [(lo, min(lo + BLOCK, full)) for lo in range(0, full, BLOCK)] + [(full, RATED)]
    rated = [x[r, lo:hi] for lo, hi in parts for r in range(WORLD)]
    negs = [x[r, RATED + lo * NEGATIVES:RATED + hi * NEGATIVES] for lo, hi in parts for r in range(WORLD)]
    return torch.cat(rated + negs)


def _worker(rank: int) -> None:
    import torch.distributed as dist

    from twotower_lit.distributed.candidates import AllRanks

    user, item, items, labels, counts = _rows()
    mine_u, mine_i = user[rank].clone().requires_grad_(), item[rank].clone().requires_grad_()
    loss = _loss(BLOCK, AllRanks())
    loss.set_item_counts(counts)
    value, _ = loss(mine_u, mine_i, items[rank], labels[rank])
    value.backward()

    # one process, both ranks' rows, blocks of WORLD x BLOCK rows
    one_u = _one_process_layout(user).requires_grad_()
    one_i = _one_process_layout(item).requires_grad_()
    one = _loss(WORLD * BLOCK)
    one.set_item_counts(counts)
    reference, _ = one(one_u, one_i, _one_process_layout(items), _one_process_layout(labels))
    reference.backward()

    # the ranks' mean (what the averaged gradients train) is the one process's loss
    values = [torch.zeros((), dtype=torch.float64) for _ in range(WORLD)]
    dist.all_gather(values, value.detach())
    torch.testing.assert_close(sum(values) / WORLD, reference.detach(), rtol=0, atol=1e-6)
    # each rank's rows got the one process's gradients (times the ranks, which averaging divides
    # by): the item vectors' include every other rank's queries
    index = torch.arange(WORLD * RATED * (1 + NEGATIVES)).view(WORLD, -1, 1).expand(-1, -1, DIM)
    where = _one_process_layout(index)[:, 0]  # row of the one-process batch -> (rank, row) flat index
    grad_u = torch.zeros(WORLD * RATED * (1 + NEGATIVES), DIM, dtype=torch.float64)
    grad_i = torch.zeros_like(grad_u)
    grad_u[where], grad_i[where] = one_u.grad, one_i.grad
    rows = slice(rank * RATED * (1 + NEGATIVES), (rank + 1) * RATED * (1 + NEGATIVES))
    torch.testing.assert_close(mine_u.grad, WORLD * grad_u[rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(mine_i.grad, WORLD * grad_i[rows], rtol=0, atol=1e-6)
    assert mine_i.grad[RATED:].abs().sum() > 0  # the negatives' vectors are trained too
    # and it differs from each rank scoring only its own rows
    local = _loss(BLOCK)
    local.set_item_counts(counts)
    assert not torch.allclose(local(user[rank], item[rank], items[rank], labels[rank])[0], value.detach())


def test_two_ranks_train_the_softmax_of_one_process_over_both_ranks_rows(tmp_path):
    run_ranks(_worker, WORLD, tmp_path)
