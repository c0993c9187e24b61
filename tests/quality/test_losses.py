"""The two-tower objectives: BCE, in-batch sampled softmax with log-Q correction, their sum."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twotower_lit.losses import (TwoTowerLoss, plain_sampled_softmax_terms, sampled_softmax_loss,
                                 sampled_softmax_terms)


def _batch(n_rated: int, negatives: int, dim: int = 4, num_items: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = n_rated * (1 + negatives)
    user = torch.randn(rows, dim, generator=g, requires_grad=True)
    item = torch.randn(rows, dim, generator=g, requires_grad=True)
    items = torch.randint(1, num_items, (rows,), generator=g)
    labels = torch.zeros(rows)
    labels[:n_rated] = (torch.rand(n_rated, generator=g) > 0.4).float()
    return user, item, items, labels


def test_log_q_correction_discounts_popular_negatives_not_the_positive():
    """Equal scores: a negative expected 9 times among the samples weighs 1/9 in the partition
    function, one expected once weighs 1; the positive's own column is never corrected."""
    expected_counts = torch.tensor([9.0, 1.0])
    vecs = torch.ones(2, 3)
    items = torch.tensor([1, 2])
    popular_negative = sampled_softmax_loss(vecs[1:], vecs, torch.tensor([1]), items, expected_counts.log())
    rare_negative = sampled_softmax_loss(vecs[:1], vecs, torch.tensor([0]), items, expected_counts.log())
    uncorrected = sampled_softmax_loss(vecs[:1], vecs, torch.tensor([0]), items, torch.zeros(2))
    assert uncorrected.item() == pytest.approx(math.log(2))
    assert popular_negative.item() == pytest.approx(math.log(1 + 1 / 9), rel=1e-5)
    assert rare_negative.item() == pytest.approx(math.log(2), rel=1e-5)


def _fit_item_scores(corrected: bool, steps: int = 400) -> np.ndarray:
    """One user whose liked items follow popularity p; in-batch candidates are sampled from p as
    well. Fit a free score per item with the sampled softmax (with or without log-Q)."""
    torch.manual_seed(0)
    counts = np.array([0, 40, 20, 10, 5, 5, 5, 5, 5, 5], dtype=np.float64)  # item 0: out of vocabulary
    p = torch.from_numpy(counts[1:] / counts.sum())
    loss_fn = TwoTowerLoss("softmax", num_items=len(counts))
    if corrected:
        loss_fn.set_item_counts(counts)
    scores = torch.zeros(len(counts), 1, requires_grad=True)
    opt = torch.optim.Adam([scores], lr=0.05)
    for _ in range(steps):
        items = torch.multinomial(p, 64, replacement=True) + 1
        loss, _ = loss_fn(torch.ones(64, 1), scores[items], items, torch.ones(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return scores.detach().squeeze(1).numpy()[1:], np.log(counts[1:])


def test_log_q_correction_recovers_the_full_softmax():
    """With the correction the scores approach log p (the full softmax's optimum); without it the
    in-batch softmax removes popularity (scores nearly flat), which is what hurts retrieval."""
    corrected, log_p = _fit_item_scores(corrected=True)
    uncorrected, _ = _fit_item_scores(corrected=False)
    spread = lambda s: s[0] - s[-1]  # noqa: E731  (most popular minus least popular item)
    assert np.corrcoef(corrected, log_p)[0, 1] > 0.95
    assert spread(corrected) == pytest.approx(spread(log_p), abs=0.5)
    assert abs(spread(uncorrected)) < 0.5 < spread(corrected)


def test_accidental_hits_are_masked():
    """A second column holding the query's own item is left out of the softmax, whatever its score."""
    queries = torch.tensor([[1.0, 0.0]])
    candidates = torch.tensor([[1.0, 0.0], [50.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([7, 7, 3])  # columns 0 and 1 are the same movie
    log_q = torch.zeros(3)
    loss = sampled_softmax_loss(queries, candidates, torch.tensor([0]), items, log_q)
    expected = F.cross_entropy(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))  # columns 0 and 2 only
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(loss)


def test_temperature_divides_scores_not_the_correction():
    queries, candidates = torch.tensor([[2.0]]), torch.tensor([[1.0], [-1.0]])
    log_q = torch.tensor([0.3, -0.2])
    loss = sampled_softmax_loss(queries, candidates, torch.tensor([0]), torch.tensor([1, 2]), log_q, temperature=0.5)
    logits = torch.tensor([[2.0 / 0.5, -2.0 / 0.5 + 0.2]])  # the positive's own column is not corrected
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0])).item(), rel=1e-6)


def test_bce_is_the_workshop_objective_over_every_row():
    user, item, items, labels = _batch(8, negatives=2)
    loss, parts = TwoTowerLoss("bce", num_items=20, negatives=2)(user, item, items, labels)
    expected = F.binary_cross_entropy_with_logits((user * item).sum(1), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and set(parts) == {"bce"}


def test_both_is_rated_row_bce_plus_weighted_softmax():
    user, item, items, labels = _batch(8, negatives=3)
    counts = np.arange(20, dtype=np.float64)
    both = TwoTowerLoss("both", num_items=20, negatives=3, softmax_weight=0.3)
    softmax = TwoTowerLoss("softmax", num_items=20, negatives=3)
    for fn in (both, softmax):
        fn.set_item_counts(counts)
    loss, parts = both(user, item, items, labels)
    rated_bce = F.binary_cross_entropy_with_logits((user[:8] * item[:8]).sum(1), labels[:8])  # negatives excluded
    assert parts["bce"].item() == pytest.approx(rated_bce.item(), rel=1e-6)
    assert parts["softmax"].item() == pytest.approx(softmax(user, item, items, labels)[0].item(), rel=1e-6)
    assert loss.item() == pytest.approx(rated_bce.item() + 0.3 * parts["softmax"].item(), rel=1e-6)


def test_exposure_dims_are_left_out_of_the_bce_logit_and_scored_by_the_softmax():
    user, item, items, labels = _batch(8, negatives=0, dim=6)
    split = TwoTowerLoss("both", num_items=20, softmax_weight=0.3, exposure_dims=2)
    whole = TwoTowerLoss("softmax", num_items=20)
    for fn in (split, whole):
        fn.set_item_counts(np.arange(20, dtype=np.float64))
    loss, parts = split(user, item, items, labels)
    liking = (user[:, :4] * item[:, :4]).sum(1)
    assert parts["bce"].item() == pytest.approx(F.binary_cross_entropy_with_logits(liking, labels).item(), rel=1e-6)
    assert parts["softmax"].item() == pytest.approx(whole(user, item, items, labels)[0].item(), rel=1e-6)
    # the BCE term alone sends nothing to the last two dimensions; the softmax does
    parts["bce"].backward(retain_graph=True)
    assert user.grad[:, 4:].abs().sum() == 0 and user.grad[:, :4].abs().sum() > 0
    user.grad = None
    parts["softmax"].backward()
    assert user.grad[:, 4:].abs().sum() > 0


def test_uniform_negatives_join_as_candidates_with_the_mixture_correction():
    """With n rated rows and m uniform negatives the expected count of item i among the candidates
    is n q_i + m / (items - 1): the loss must equal the softmax built by hand with that correction."""
    user, item, items, labels = _batch(6, negatives=2, num_items=10)
    counts = np.array([1, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=np.float64)
    fn = TwoTowerLoss("softmax", num_items=10, negatives=2)
    fn.set_item_counts(counts)
    loss, _ = fn(user, item, items, labels)
    q = torch.from_numpy(counts / counts.sum()).float()[items]
    log_q = (5 * q + 12 / 9).log()  # per query: the 5 other rated rows + 12 uniform draws
    positive = torch.nonzero(labels[:6] > 0.5).squeeze(1)
    expected = sampled_softmax_loss(user[positive], item, positive, items, log_q)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_popularity_negatives_are_corrected_by_the_samplers_own_probabilities():
    """Mixed negative sampling: the in-batch candidates come from the training rows (q) and the
    sampled ones from the sampler's distribution (here counts to the power 0.5); each item's
    expected count is the sum of both sources', with the probabilities the sampler draws by."""
    from twotower_lit.data.negatives import NegativeSampler, negative_probabilities

    user, item, items, labels = _batch(6, negatives=2, num_items=10)
    counts = np.array([0, 9, 8, 7, 6, 5, 4, 3, 2, 0], dtype=np.float64)
    p = negative_probabilities(10, "popularity", counts, power=0.5)
    smoothed = np.maximum(counts, 0.5) ** 0.5
    smoothed[0] = 0
    np.testing.assert_allclose(p, smoothed / smoothed.sum())
    fn = TwoTowerLoss("softmax", num_items=10, negatives=2)
    fn.set_item_counts(counts, p)
    loss, _ = fn(user, item, items, labels)
    q = np.maximum(counts, 0.5) / np.maximum(counts, 0.5).sum()
    log_q = torch.from_numpy(np.log(5 * q + 12 * p)).float()[items]  # 5 other rated rows, 12 sampled
    positive = torch.nonzero(labels[:6] > 0.5).squeeze(1)
    expected = sampled_softmax_loss(user[positive], item, positive, items, log_q)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the uniform default is not that
    uniform = TwoTowerLoss("softmax", num_items=10, negatives=2)
    uniform.set_item_counts(counts)
    assert uniform(user, item, items, labels)[0].item() != pytest.approx(expected.item(), rel=1e-3)
    # and the sampler draws by those probabilities (no rated items to reject)
    sampler = NegativeSampler(np.zeros(0, dtype=np.int64), 10, "popularity", counts, power=0.5)
    _, drawn = sampler.sample(np.ones(200_000, dtype=np.int64), 1, np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(drawn, minlength=10) / len(drawn), p, atol=3e-3)


@pytest.mark.parametrize("kind", ["bce", "softmax", "both"])
def test_gradients_reach_both_towers(kind):
    user, item, items, labels = _batch(16, negatives=1)
    fn = TwoTowerLoss(kind, num_items=20, negatives=1, vector_l2=1e-3)
    fn.set_item_counts(np.ones(20))
    loss, _ = fn(user, item, items, labels)
    loss.backward()
    for t in (user, item):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_batch_without_a_liked_row_gives_zero_softmax_that_still_backpropagates():
    user, item, items, labels = _batch(4, negatives=0)
    labels.zero_()
    loss, parts = TwoTowerLoss("softmax", num_items=20)(user, item, items, labels)
    loss.backward()
    assert loss.item() == 0.0 and user.grad is not None and item.grad is not None


def test_vector_l2_adds_the_mean_squared_norm():
    user, item, items, labels = _batch(8, negatives=0)
    plain, _ = TwoTowerLoss("bce", num_items=20)(user, item, items, labels)
    loss, parts = TwoTowerLoss("bce", num_items=20, vector_l2=0.1)(user, item, items, labels)
    norm = (user.pow(2).sum(1) + item.pow(2).sum(1)).mean()
    assert loss.item() == pytest.approx(plain.item() + 0.1 * norm.item(), rel=1e-6)


def test_the_vector_l2_terms_gradient_is_autograds_of_the_same_expression():
    """`mean_squared_norm` writes its backward pass by hand (fewer operations per step)."""
    from twotower_lit.losses import mean_squared_norm

    g = torch.Generator().manual_seed(5)
    u0, i0 = torch.randn(33, 6, generator=g), torch.randn(33, 6, generator=g)
    upstream = torch.randn((), generator=g)
    results = []
    for fn in (lambda u, i: (u.pow(2).sum(1) + i.pow(2).sum(1)).mean(), mean_squared_norm):
        u, i = u0.clone().requires_grad_(), i0.clone().requires_grad_()
        value = fn(u, i)
        value.backward(upstream)
        results.append((value.detach(), u.grad, i.grad))
    (v_ref, gu_ref, gi_ref), (v, gu, gi) = results
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(gu, gu_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(gi, gi_ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="one of each per row"):
        mean_squared_norm(u0, i0[:5])


def test_bad_settings_and_layouts_are_refused():
    with pytest.raises(ValueError, match="loss must be one of"):
        TwoTowerLoss("hinge")
    with pytest.raises(ValueError, match="temperature"):
        TwoTowerLoss("softmax", temperature=0)
    with pytest.raises(ValueError, match="cover 3 items"):
        TwoTowerLoss("softmax", num_items=5).set_item_counts(np.ones(3))
    user, item, items, labels = _batch(5, negatives=0)
    with pytest.raises(ValueError, match="cannot be n rated rows"):
        TwoTowerLoss("both", num_items=20, negatives=2)(user, item, items, labels)


def test_unrated_items_get_a_finite_correction():
    fn = TwoTowerLoss("softmax", num_items=4)
    fn.set_item_counts(np.array([0, 10, 0, 5]))
    assert torch.isfinite(fn.log_q).all() and fn.log_q[2] < fn.log_q[3] < fn.log_q[1]
    assert "log_q" not in fn.state_dict()  # not persisted: the job sets it from the training data


def test_softmax_over_blocks_is_each_blocks_own_in_batch_softmax():
    """``softmax_rows`` splits the batch into blocks of rated rows, each with its share of the
    negatives, scored as a batch of its own (its candidates and its log-Q correction); the loss is
    the mean over all liked rows. A block at least the batch's size changes nothing."""
    n, negatives, block = 11, 2, 4
    user, item, items, labels = _batch(n, negatives=negatives, num_items=12, seed=3)
    counts = np.arange(1, 13, dtype=np.float64)

    def loss_of(rows, u, i, it, y):
        fn = TwoTowerLoss("softmax", num_items=12, negatives=negatives, softmax_rows=rows)
        fn.set_item_counts(counts)
        return fn(u, i, it, y)[0]

    whole = loss_of(0, user, item, items, labels)
    assert loss_of(n, user, item, items, labels).item() == pytest.approx(whole.item(), rel=1e-6)
    assert loss_of(50, user, item, items, labels).item() == pytest.approx(whole.item(), rel=1e-6)
    # by hand: blocks [0, 4), [4, 8), [8, 11), each with the negatives of its rated rows' span
    total = liked = 0.0
    for lo, hi in ((0, 4), (4, 8), (8, 11)):
        rows = torch.cat([torch.arange(lo, hi), n + torch.arange(lo * negatives, hi * negatives)])
        y = labels[rows]
        k = float((y[:hi - lo] > 0.5).sum())
        if k:
            total += loss_of(0, user[rows], item[rows], items[rows], y).item() * k
            liked += k
    assert liked > 0
    blocked = loss_of(block, user, item, items, labels)
    assert blocked.item() == pytest.approx(total / liked, rel=1e-5)
    assert blocked.item() != pytest.approx(whole.item(), rel=1e-3)  # smaller blocks: other candidates
    blocked.backward()
    assert torch.isfinite(user.grad).all() and user.grad[:n].abs().sum(1).gt(0).sum() > 0


def test_negative_softmax_rows_is_refused():
    with pytest.raises(ValueError, match="softmax_rows"):
        TwoTowerLoss("softmax", num_items=5, softmax_rows=-1)


@pytest.mark.parametrize("blocks", [(), (3,)])
def test_the_softmax_terms_are_their_plain_definition_gradients_included(blocks):
    """`sampled_softmax_terms` (its backward pass written out) gives the loss and gradients of
    `plain_sampled_softmax_terms` (autograd's operations): with accidental hits, weights 0 and 1,
    a temperature, more candidates than queries, positives anywhere among them, and blocks."""
    g = torch.Generator().manual_seed(5)
    q_rows, c_rows, dim = 6, 14, 3
    queries = torch.randn(*blocks, q_rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(*blocks, c_rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    items = torch.randint(1, 5, (*blocks, c_rows), generator=g)  # 4 items among 14 columns: many hits
    positive = torch.stack([torch.randperm(c_rows, generator=g)[:q_rows] for _ in range(math.prod(blocks))])
    positive = positive.view(*blocks, q_rows)
    log_q = torch.randn(*blocks, c_rows, generator=g, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64).expand(*blocks, q_rows)
    found = {}
    for name, fn in (("written out", sampled_softmax_terms), ("plain", plain_sampled_softmax_terms)):
        total, weight = fn(queries, candidates, positive, items, log_q, 0.7, weights)
        found[name] = (total, weight, *torch.autograd.grad(total * 1.5, (queries, candidates)))
    for mine, plain in zip(found["written out"], found["plain"]):
        torch.testing.assert_close(mine, plain, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(found["plain"][0]) and found["plain"][2].abs().sum() > 0
    # accidental hits were there to mask, and they got no gradient through the mask
    own = items.gather(-1, positive)
    assert ((items.unsqueeze(-2) == own.unsqueeze(-1)).sum(-1) > 1).any()
    assert torch.autograd.gradcheck(
        lambda q, c: sampled_softmax_terms(q, c, positive, items, log_q, 0.7, weights)[0], (queries, candidates))


def test_the_softmax_takes_no_gradient_for_the_correction_or_the_weights():
    queries, candidates = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="log_q and weights detached"):
        sampled_softmax_terms(queries, candidates, torch.tensor([0, 1]), torch.arange(4),
                              torch.zeros(4, requires_grad=True))


def test_the_softmax_benchmark_times_both_and_finds_them_equal(capsys):
    from benchmarks.loss_bench import main

    main(["--device", "cpu", "--rows", "256", "--block", "64", "--items", "50", "--dim", "8", "--steps", "1",
          "--repeats", "1", "--tf32", "false"])  # (float32 matmul precision is process-wide: left at its default)
    out = capsys.readouterr().out
    timed = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "implementation" not in line]
    assert [cells[1].strip() for cells in timed] == ["autograd's operations (plain)",
                                                     "backward written out (the job's)"]
    assert all(float(cells[2]) > 0 for cells in timed)
    assert float(out.rsplit("gradients: ", 1)[1]) < 1e-5
