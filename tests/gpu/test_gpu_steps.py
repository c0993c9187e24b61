"""The GPU's training steps, batches and evaluation, in the test process against their references:
graphed steps (captured and replayed CUDA graphs) against eager ones, batches built on the GPU
against the host's, the full ranking on the GPU against the CPU's."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from tests.training.conftest import local_state

pytestmark = pytest.mark.gpu

ROWS = 1024  # rows per full batch; the genre counts then stay well inside the graph's capacity


def _state(model):
    """`local_state` of `model` on the host. (Lightning's teardown moves a fitted module to the CPU,
    and whether a sharded table's views follow is TorchRec's business: compare host copies.)"""
    return {k: v.detach().cpu() for k, v in local_state(model).items()}


def _batch(dm, rows, seed):
    """`rows` training rows drawn with `seed`, built on the host as the streaming loader builds them."""
    train = dm.splits["train"]
    idx = np.random.default_rng(seed).integers(0, len(train["user"]), rows)
    return dm.builder.batch(train["user"][idx].astype(np.int64), train["item"][idx].astype(np.int64),
                            train["label"][idx])


def _module(dm, pg, device, for_capture=False, **options):
    """A small two-tower under DMP on `device` (one table-wise rank), trained with the job's default
    objective (`twotower_lit.training` builds the same loss)."""
    from twotower_lit.config import ModelConfig, OptimConfig, TrainConfig
    from twotower_lit.losses import TwoTowerLoss
    from twotower_lit.model import feature_specs
    from twotower_lit.distributed.sharding import shard_module
    from twotower_lit.training.module import TwoTowerModule

    job = TrainConfig()
    model_cfg = ModelConfig(embedding_dim=16, user_layers=[32, 16], item_layers=[32, 16], exposure_dims=4)
    loss = TwoTowerLoss(job.loss.kind, num_items=dm.num_items, negatives=0, softmax_weight=job.loss.softmax_weight,
                        temperature=job.loss.softmax_temperature, vector_l2=job.loss.vector_l2,
                        softmax_rows=job.loss.softmax_rows,
                        exposure_dims=model_cfg.exposure_dims)
    loss.set_item_counts(dm.item_counts)
    lm = TwoTowerModule(feature_specs(dm.manifest), model_cfg, OptimConfig(embedding_lr=0.1, dense_lr=0.01), 100,
                        loss=loss, **options)
    shard_module(lm, pg, device, default="table_wise", for_capture=for_capture)
    return lm.to(device)


class _Losses(L.Callback):
    """Keeps each training call's loss (one step per call here)."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(loss.detach().float().cpu()))


# largest difference allowed between graphed and eager training (every parameter, every step's
# loss): without TF32 the same kernels run in both, so they agree to float32 rounding; with TF32
# the towers' matmuls round to 10-bit mantissas, and the tolerance is that of TF32's error
TOLERANCE = {"highest": 1e-5, "high": 1e-3}


@pytest.mark.parametrize("precision", ["highest", "high"], ids=["tf32-off", "tf32-on"])
def test_graphed_steps_train_as_eager_steps(gpu_data, device_group, device, matmul_precision, precision):
    """Two Lightning fits from the same initial weights on the same batches: one eager step per
    batch (`EagerSteps`), and the training job's graphed steps (`GraphedSteps`: warm-up steps,
    then the step captured as one CUDA graph and replayed for every full batch, genres padded to
    the graph's fixed capacity). Every step's loss and every parameter at the end agree within
    TOLERANCE (float32 matmuls: 1e-5; TF32: 1e-3), but genres row 0, the padding's row, which the
    graphed run keeps at zero. The epoch's shorter last batch runs eagerly, counted as another
    shape."""
    from twotower_lit.graphs import WARMUP_STEPS
    from twotower_lit.model import feature_specs
    from twotower_lit.training.steps import GraphedSteps

    matmul_precision(precision)
    dm = gpu_data
    full = 12
    # the full batch with the most genre values first: the graph's input is shaped on it
    batches = sorted((_batch(dm, ROWS, seed) for seed in range(full)),
                     key=lambda b: -len(b.features["genres"].values()))
    batches.append(_batch(dm, 300, full))

    def fit(**options):
        torch.manual_seed(0)
        lm = _module(dm, device_group, device, **options)
        losses = _Losses()
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[losses])
        trainer.fit(lm, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        assert trainer.global_step == len(batches)
        return _state(lm.model), losses.values, lm

    torch.manual_seed(0)
    initial = _state(_module(dm, device_group, device).model)
    eager, eager_losses, _ = fit()
    genres = next(f for f in feature_specs(dm.manifest) if f.name == "genres")
    graphed, graphed_losses, lm = fit(for_capture=True, steps=GraphedSteps(1, multi_valued=genres))

    report = lm.steps.report()
    captured = device.type == "cuda"
    assert report["captured"] is captured
    assert report["replays"] == (full - WARMUP_STEPS if captured else 0)
    assert report["eager_steps"] == (WARMUP_STEPS if captured else full)
    assert report["other_shapes"] == 1 and report["first_other_shape"] == f"300 rows, not {ROWS}"
    # the multi-valued feature was padded on every full batch: its capacity exceeds each one's count
    genre_key = dm.builder.keys.index("genres")
    counts = [b.features.length_per_key()[genre_key] for b in batches[:full]]
    assert len(set(counts)) > 1 and report["multi_valued_capacity"] > max(counts)

    tol = TOLERANCE[precision]
    assert len(eager_losses) == len(graphed_losses) == len(batches)
    np.testing.assert_allclose(graphed_losses, eager_losses, rtol=0, atol=tol)
    genres = next(k for k in eager if "t_genres" in k)
    assert torch.equal(graphed[genres][0], torch.zeros_like(graphed[genres][0]))
    assert eager[genres][0].abs().sum() > 0
    assert eager.keys() == graphed.keys()
    moved = 0.0
    for key in eager:
        a, b = (eager[key][1:], graphed[key][1:]) if key == genres else (eager[key], graphed[key])
        torch.testing.assert_close(b, a, rtol=0, atol=tol, msg=lambda m, key=key: f"{key}: {m}")
        start = initial[key][1:] if key == genres else initial[key]
        moved = max(moved, float((a - start).abs().max()))
    assert moved > 100 * tol  # the runs trained: agreement is not that of two untouched models


def _same_batch(got, want, device):
    """`got` (built on `device`) holds exactly `want`'s features, labels and flags."""
    g, w = got.features, want.features
    assert got.labels.device.type == device.type and g.values().device.type == device.type
    assert g.keys() == w.keys() and g.stride() == w.stride()
    assert g.length_per_key() == w.length_per_key()
    assert torch.equal(g.values().cpu(), w.values()) and torch.equal(g.lengths().cpu().int(), w.lengths().int())
    assert torch.equal(got.labels.cpu(), want.labels) and torch.equal(got.rated.cpu(), want.rated)


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 0), (2, 1)], ids=["1rank", "2ranks-rank0", "2ranks-rank1"])
def test_device_resident_batches_equal_the_host_loaders(gpu_data, device, world, rank):
    """`--data-on-device` batches gathered on the GPU against the host's, for a rank of 1 or 2
    (neither reader needs a process group: each is built for its rank). In shard order (no
    shuffling) the streaming loader's batches, one for one, an epoch's shorter last batch
    included; shuffled, the GPU's permutation of the rank's rows built on the host by the same
    `KJTBuilder` the streaming loader uses. Exact equality: ids and labels are only gathered."""
    from twotower_lit.data.device_batches import DeviceResidentBatches
    from twotower_lit.data.loader import RatingsShardReader

    dm = gpu_data
    source, size = dm.source("train"), 1000  # the rank's rows are no multiple of 1000: a shorter last batch

    def on_device(shuffle):
        reader = DeviceResidentBatches(dm.splits["train"], source.rows, dm.builder, size, world=world, rank=rank,
                                       seed=dm.seed, shuffle=shuffle, device=device)
        reader.set_epoch(1)
        return reader

    reader = on_device(False)
    host = RatingsShardReader(source, dm.builder, size, world=world, rank=rank, seed=dm.seed, shuffle=False)
    host.set_epoch(1)
    got, want = list(reader), list(host)
    assert len(got) == len(want) == len(reader) > 2
    assert len(got[-1].labels) < size
    for g, w in zip(got, want):
        _same_batch(g, w, device)

    reader = on_device(True)
    index, first = reader.epoch_rows()
    assert index.device.type == device.type
    index, first = index.cpu().numpy(), first.cpu().numpy()
    train = dm.splits["train"]
    batches = list(reader)
    assert len(batches) == len(reader)
    for b, lo in zip(batches, range(0, len(index), size)):
        rows = index[lo:lo + size]
        _same_batch(b, dm.builder.batch(train["user"][rows].astype(np.int64), train["item"][rows].astype(np.int64),
                                        train["label"][rows], first[lo:lo + size]), device)


def test_full_ranking_on_the_gpu_equals_the_cpu_computation(gpu_data, device_group, device, matmul_precision):
    """The retrieval evaluation (`evaluate_retrieval`: tower vectors of every item and test user,
    then every unseen item ranked per user) of a model on the GPU against the same weights in a
    plain CPU model, as the export holds them: the vectors agree to float32 rounding (1e-5, TF32
    off), and the ranking of the same vectors on either device, and Recall@10 / NDCG@10 of the two
    models, differ by at most one user's near-tie at the cut-off (1 / ranked users)."""
    from twotower_lit.evaluation import evaluate_retrieval, tower_matrix
    from twotower_lit.export.writer import unsharded_model
    from twotower_lit.metrics import rank_users
    from twotower_lit.training.module import TwoTowerModule

    matmul_precision("highest")
    dm = gpu_data
    torch.manual_seed(1)
    lm = _module(dm, device_group, device).eval()
    on_cpu = TwoTowerModule(lm.features, lm.model_cfg, lm.optim_cfg)
    on_cpu.model = unsharded_model(_state(lm.model), lm.features, lm.model_cfg)
    positives = dm.positives["test"]
    users = np.flatnonzero(positives.lengths() > 0).astype(np.int64)
    assert len(users) > 100
    cpu = torch.device("cpu")

    items = np.arange(dm.num_items, dtype=np.int64)
    item_vectors = tower_matrix(lm, dm.builder, items, "item", 4096, device)
    user_vectors = tower_matrix(lm, dm.builder, users, "user", 4096, device)
    assert item_vectors.device.type == device.type
    torch.testing.assert_close(item_vectors.cpu(), tower_matrix(on_cpu, dm.builder, items, "item", 4096, cpu),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(user_vectors.cpu(), tower_matrix(on_cpu, dm.builder, users, "user", 4096, cpu),
                               rtol=0, atol=1e-5)

    here = rank_users(user_vectors, users, item_vectors, dm.seen, positives, 10)
    there = rank_users(user_vectors.cpu(), users, item_vectors.cpu(), dm.seen, positives, 10)
    assert here.users == there.users == len(users)
    # (the same vectors: only the scores' matmul rounds otherwise, which can reorder one near-tie)
    assert here.recall == pytest.approx(there.recall, abs=1 / len(users))
    assert here.ndcg == pytest.approx(there.ndcg, abs=1 / len(users))

    gpu = evaluate_retrieval(lm, dm.builder, dm.num_items, users, dm.seen, positives, 10, 4096, device).as_dict(10)
    ref = evaluate_retrieval(on_cpu, dm.builder, dm.num_items, users, dm.seen, positives, 10, 4096, cpu).as_dict(10)
    assert gpu["ranked_users"] == ref["ranked_users"] == len(users)
    assert gpu["recall@10"] > 0
    for key in ("recall@10", "ndcg@10"):
        assert gpu[key] == pytest.approx(ref[key], abs=1 / len(users)), key
