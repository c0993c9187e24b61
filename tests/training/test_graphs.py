"""Training steps on fixed-shape input (`twotower_lit.graphs`), the form a CUDA graph replays.

The capture itself needs a GPU (`benchmarks/train_throughput.py --modes graphed --check-graphed N`
trains the same model eagerly and by replays side by side there); what is checked here, on CPU,
is what the graph runs: the padded input and the step on it, which must train exactly as the
eager step on the batch as it came."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.ranks import run_ranks
from tests.training.conftest import local_state, sharded_module
from twotower_lit.model import feature_specs


def _batch(dm, rows, seed):
    train = dm.splits["train"]
    idx = np.random.default_rng(seed).integers(0, len(train["user"]), rows)
    return dm.builder.batch(train["user"][idx].astype(np.int64), train["item"][idx].astype(np.int64),
                            train["label"][idx])


def _sharded_module(dm, pg, sharding="table_wise", **options):
    from twotower_lit.config import OptimConfig

    return sharded_module(dm, OptimConfig(embedding_lr=0.1, dense_lr=0.01), pg, 100, sharding, **options)


def test_padded_input_gives_every_row_its_sums_and_bag_lengths(data):
    """Batches with different genre counts copied into the same tensors: pooled with row 0 of the
    genres table at zero, every feature's sums are those of the batch as it came, the bag lengths
    are the real ones, the padding is spread at most one slot per row, and a batch that does not
    fit is named, not copied."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from twotower_lit.graphs import FixedShapeInput

    sizes = data.manifest["vocab_sizes"]
    keys = data.builder.keys
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t_{k}", embedding_dim=4, num_embeddings=sizes[k],
                                                            feature_names=[k]) for k in keys])
    with torch.no_grad():
        ebc.embedding_bags["t_genres"].weight[0].zero_()
    batches = [_batch(data, 256, seed) for seed in range(6)]
    totals = [b.features.length_per_key()[keys.index("genres")] for b in batches]
    assert len(set(totals)) > 1, totals
    fixed = FixedShapeInput(batches[0], "genres")
    assert fixed.capacity >= max(totals[:1])
    g = keys.index("genres")
    for b in batches:
        if fixed.why_not(b) is not None:
            continue
        fixed.load(b)
        features, bag_lengths, items = fixed.build()
        assert features.length_per_key() == fixed.per_key and len(features.values()) == len(fixed.values)
        assert torch.equal(ebc(features).values(), ebc(b.features).values())
        assert torch.equal(bag_lengths, b.features.lengths().view(len(keys), -1))
        assert torch.equal(items, b.features["item"].values())
        padded = features.lengths().view(len(keys), -1)[g] - b.features.lengths().view(len(keys), -1)[g]
        assert int(padded.sum()) == fixed.capacity - b.features.length_per_key()[g] and int(padded.max()) <= 1
        assert int((features["genres"].values() == 0).sum()) == int(padded.sum())  # the padding is genre 0
    assert fixed.why_not(_batch(data, 100, 9)) == "100 rows, not 256"
    crowded = _batch(data, 256, 1)
    kjt = crowded.features
    many = kjt.length_per_key()[g] + fixed.capacity
    assert f"{many} genres values, over the {fixed.capacity}" in FixedShapeInput.why_not(
        fixed, dataclasses.replace(crowded, features=type(kjt)(
            keys=kjt.keys(), values=torch.zeros(len(kjt.values()) + fixed.capacity, dtype=torch.long),
            lengths=kjt.lengths(), stride=kjt.stride(),
            length_per_key=[n + (fixed.capacity if j == g else 0) for j, n in enumerate(kjt.length_per_key())])))


def test_ids_only_batches_are_copied_as_they_are(data):
    """Without a multi-valued feature (--side-features false) nothing is padded."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from twotower_lit.data.batches import KJTBuilder
    from twotower_lit.graphs import FixedShapeInput

    builder = KJTBuilder(data.tables, ["user"], ["item"])
    train = data.splits["train"]
    batches = [builder.batch(train["user"][lo:lo + 64].astype(np.int64), train["item"][lo:lo + 64].astype(np.int64),
                             train["label"][lo:lo + 64]) for lo in (0, 64)]
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t_{k}", embedding_dim=4, feature_names=[k],
                                                            num_embeddings=data.manifest["vocab_sizes"][k])
                                         for k in ("user", "item")])
    fixed = FixedShapeInput(batches[0], None)
    assert fixed.capacity == 0 and len(fixed.values) == 128
    for b in batches:
        fixed.load(b)
        features, bag_lengths, items = fixed.build()
        assert torch.equal(ebc(features).values(), ebc(b.features).values())
        assert torch.equal(items, b.features["item"].values()) and torch.equal(fixed.labels, b.labels)


@pytest.mark.parametrize("sharding", ["table_wise", "data_parallel"])
def test_padding_rows_are_the_tables_own_row_zero(process_group, data, sharding):
    """`first_rows` returns views into the sharded collection's weights: zeroing them makes the
    lookup of genre 0 a zero vector (fused table_wise tables and replicated ones)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from twotower_lit.distributed.sharding import first_rows

    lm = _sharded_module(data, process_group, sharding)
    keys = data.builder.keys
    features = KeyedJaggedTensor(keys=keys, values=torch.zeros(len(keys), dtype=torch.long),
                                 lengths=torch.ones(len(keys), dtype=torch.int32), stride=1)
    ebc = lm.model.module.ebc if hasattr(lm.model, "module") else lm.model._dmp_wrapped_module.ebc

    def genre_zero():
        with torch.no_grad():
            return ebc(features).to_dict()["genres"]

    assert genre_zero().abs().sum() > 0  # initialised at random
    rows = first_rows(lm.model, ["t_genres"])
    assert len(rows) == 1 and rows[0].shape == (8,)
    with torch.no_grad():
        rows[0].zero_()
    assert torch.equal(genre_zero(), torch.zeros(1, 8))
    with pytest.raises(KeyError, match="no table 't_nope'"):
        first_rows(lm.model, ["t_nope"])


def test_fixed_shape_steps_train_exactly_as_eager_steps(process_group, data):
    """Lightning fits of the same batches: graphed steps (here without capture: CPU) against one
    eager step per call. Every weight ends equal, but genres row 0, which the padding keeps at
    zero and no real genre reads; a shorter last batch runs eagerly and is counted."""
    import lightning as L

    from twotower_lit.training.steps import GraphedSteps

    # the full batch with the most genre values first: the graph's input is shaped on the first
    # batch (with some slack), and only the shorter last batch should step eagerly
    full = sorted((_batch(data, 256, seed) for seed in range(7)), key=lambda b: -len(b.features["genres"].values()))
    batches = full + [_batch(data, 100, 7)]

    def fit(**options):
        torch.manual_seed(0)
        lm = _sharded_module(data, process_group, **options)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(lm, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        return local_state(lm.model), trainer.global_step, lm

    def same_training(eager, graphed):
        genres = next(k for k in eager if "t_genres" in k)
        assert torch.equal(graphed[genres][0], torch.zeros(8)) and eager[genres][0].abs().sum() > 0
        assert eager.keys() == graphed.keys()
        for key in eager:
            a, b = (eager[key][1:], graphed[key][1:]) if key == genres else (eager[key], graphed[key])
            assert torch.equal(a, b), key

    eager, eager_steps, _ = fit()
    genres = next(f for f in feature_specs(data.manifest) if f.name == "genres")
    graphed, graphed_steps, lm = fit(steps=GraphedSteps(4, multi_valued=genres))
    assert graphed_steps == eager_steps == len(batches)
    report = lm.steps.report()
    assert report["eager_steps"] == len(batches) - 1 and report["replays"] == 0 and not report["captured"]
    assert report["other_shapes"] == 1 and report["first_other_shape"] == "100 rows, not 256"
    same_training(eager, graphed)

    # a shorter batch first (a run resumed just before an epoch's last batch): the input is shaped
    # again on the next, full batch, before any capture, and every step is counted
    batches[:] = batches[-1:] + batches[:-1]
    eager, _, _ = fit()
    graphed, _, lm = fit(steps=GraphedSteps(4, multi_valued=genres))
    report = lm.steps.report()
    assert report["eager_steps"] == len(batches) and report["other_shapes"] == 0
    assert lm.steps.graphed.input.rows == 256
    same_training(eager, graphed)


def test_cuda_graphs_option_takes_graphs_only_where_they_run():
    from twotower_lit.config import OptimConfig, TrainConfig
    from twotower_lit.options import replace_options
    from twotower_lit.training.plan import resolve_cuda_graphs

    one = {"user": "table_wise", "item": "table_wise"}
    replicated = {"user": "data_parallel", "item": "data_parallel"}

    def graphs(cfg, device, world, kinds=one, genres_from_one=True):
        return resolve_cuda_graphs(cfg, device, world, kinds, genres_from_one)[0]

    auto = TrainConfig()
    assert graphs(auto, "cuda", 1)
    assert not graphs(auto, "cpu", 1)
    assert graphs(auto, "cuda", 2, replicated)
    cosine = dataclasses.replace(auto, optim=OptimConfig(lr_schedule="cosine"))
    assert not graphs(cosine, "cuda", 1)
    assert not graphs(replace_options(auto, cuda_graphs="off"), "cuda", 1)
    with pytest.raises(ValueError, match="--lr-schedule constant"):
        graphs(replace_options(cosine, cuda_graphs="on"), "cuda", 1)
    with pytest.raises(ValueError, match="a GPU"):
        graphs(replace_options(auto, cuda_graphs="on"), "cpu", 1)
    assert graphs(replace_options(auto, cuda_graphs="on"), "cuda", 2, replicated)
    ddp = replace_options(auto, gradient_sync="ddp")
    assert graphs(ddp, "cuda", 1) and not graphs(ddp, "cuda", 2, replicated)
    with pytest.raises(ValueError, match="--gradient-sync allreduce"):
        graphs(replace_options(ddp, cuda_graphs="on"), "cuda", 2, replicated)
    adam = dataclasses.replace(auto, optim=OptimConfig(embedding_optimizer="adam"))
    assert not graphs(adam, "cuda", 1)
    with pytest.raises(ValueError, match="--embedding-optimizer rowwise_adagrad or sgd"):
        graphs(replace_options(adam, cuda_graphs="on"), "cuda", 1)
    assert not graphs(auto, "cuda", 1, genres_from_one=False)
    with pytest.raises(ValueError, match="genre indices from 1"):
        graphs(replace_options(auto, cuda_graphs="on"), "cuda", 1, genres_from_one=False)
    # several processes: a sharded table refuses (its all-to-all reads sizes on the host); auto
    # says why on a GPU
    on, why = resolve_cuda_graphs(auto, "cuda", 2, one, True)
    assert not on and "t_item, t_user are sharded" in why
    with pytest.raises(ValueError, match="every table must be replicated"):
        graphs(replace_options(auto, cuda_graphs="on"), "cuda", 2, one)


def test_several_processes_need_every_table_replicated():
    from twotower_lit.distributed.planning import graph_refusal

    assert graph_refusal(1, {"user": "table_wise"}) is None
    assert graph_refusal(2, {"user": "data_parallel", "item": "data_parallel"}) is None
    why = graph_refusal(2, {"user": "row_wise", "item": "data_parallel", "genres": "table_wise"})
    assert "t_genres, t_user are sharded" in why and "--sharding data_parallel" in why
    assert "t_user is sharded" in graph_refusal(4, {"user": "column_wise"})
    assert "t_user is sharded" in graph_refusal(2, {"user": "auto"})  # the planner never picks data_parallel


def _two_rank_graphed_worker(rank: int, data_dir: str) -> None:
    import torch.distributed as dist

    from twotower_lit.data.datamodule import MovieLensDataModule
    from twotower_lit.distributed.sharding import first_rows
    from twotower_lit.graphs import GraphedTrainingStep

    dm = MovieLensDataModule(data_dir, batch_size=256)
    dm.load()
    pg = dist.group.WORLD
    # every table replicated, as a job of several GPUs has them; each rank its own batches, so
    # each pads a different genre count
    batches = [_batch(dm, 256, 100 * rank + s) for s in range(5)]
    torch.manual_seed(10 + rank)  # (replicas start equal: rank 0's values are copied to rank 1)
    eager = _sharded_module(dm, pg, "data_parallel")
    eager_opt = eager.configure_optimizers()["optimizer"]
    torch.manual_seed(10 + rank)
    graphed = _sharded_module(dm, pg, "data_parallel")
    opt = graphed.configure_optimizers()["optimizer"]

    def loss_fn(user, item, items, labels):
        return graphed.loss_fn(user, item, items, labels)[0]

    # shaped on the batch with the most genre values, so that every batch fits
    widest = max(batches, key=lambda b: len(b.features["genres"].values()))
    step = GraphedTrainingStep(graphed.model, loss_fn, opt, widest, "genres",
                               first_rows(graphed.model, ["t_genres"]), capture=False)
    assert step.input.capacity > 0
    for b in batches:
        eager_opt.zero_grad()
        eager.batch_loss(b).backward()
        eager_opt.step()
        step(b)
    want, got = local_state(eager.model), local_state(graphed.model)
    genres = next(k for k in want if "t_genres" in k)
    assert torch.equal(got[genres][0], torch.zeros(8))
    for key in want:
        a, b = (want[key][1:], got[key][1:]) if key == genres else (want[key], got[key])
        assert torch.equal(a, b), key
    # the replicas stayed equal, and the replicated tables' optimizer counted every step
    for key, value in got.items():
        gathered = [torch.empty_like(value) for _ in range(2)]
        dist.all_gather(gathered, value)
        assert torch.equal(gathered[0], gathered[1]), key
    tables = dict(opt.optimizers)["replicated_tables"]
    assert {int(s["step"]) for s in tables.state.values()} == {len(batches)}


def test_replicated_tables_keep_their_weights_gradient_accumulator_from_construction(process_group, data):
    """Why a model whose steps several GPUs capture is built on the capture stream
    (`twotower_lit.graphs.on_capture_stream`): autograd accumulates a weight's gradient on the stream
    current when its accumulator node was made, and TorchRec's replicated tables (views of their
    lookup's fused weight) keep that node from construction on. A hook put on the node before
    training fires in the first backward pass only if the same node is used there; a tower
    weight's node, which nothing keeps, is made anew by the forward pass."""
    from twotower_lit.patches import unwrap_replicated_lookups

    lm = _sharded_module(data, process_group, "data_parallel")
    lookups = unwrap_replicated_lookups(lm.model) or [m.module for m in lm.model.modules()
                                                     if isinstance(m, torch.nn.parallel.DistributedDataParallel)]
    fused = [p for lookup in lookups for p in lookup.parameters()]
    tower = next(p for name, p in lm.model.named_parameters() if "tower" in name)
    assert fused
    fired = []
    for name, p in [("fused", w) for w in fused] + [("tower", tower)]:
        node = p.view_as(p).grad_fn.next_functions[0][0]  # the parameter's accumulator (made if none is kept)
        node.register_prehook(lambda grads, name=name: fired.append(name))
        del node
    lm.batch_loss(_batch(data, 64, 0)).backward()
    assert set(fired) == {"fused"}


def test_two_ranks_with_replicated_tables_train_on_fixed_shapes_as_eagerly(prepared_synthetic, tmp_path):
    """What several GPUs capture (here without capture, on two gloo processes): every table
    replicated, gradients averaged by one all-reduce; both ranks end as eager training does."""
    run_ranks(_two_rank_graphed_worker, 2, tmp_path, str(prepared_synthetic))


def test_host_work_of_a_captured_step_is_registered_for_every_replay():
    """The replicated tables' optimizer counts its steps in host tensors: during a capture it
    registers that count to run again after each replay; outside one it registers nothing."""
    from twotower_lit.graphs import recording_host_work
    from twotower_lit.optim import GroupedRowWiseAdagrad

    table = torch.nn.Parameter(torch.randn(5, 4))
    opt = GroupedRowWiseAdagrad([table], lr=0.1)
    table.grad = torch.ones(5, 4)
    with recording_host_work() as work:
        opt.step()
    assert int(opt.state[table]["step"]) == 1 and len(work) == 1
    for replay in work * 3:
        replay()
    assert int(opt.state[table]["step"]) == 4
    opt.step()  # not recording
    assert int(opt.state[table]["step"]) == 5 and len(work) == 1


def test_the_summary_names_how_the_steps_ran(capsys):
    from twotower_lit.training.report import print_summary

    from twotower_lit.metrics import retrieval_names

    test = {"auc": 0.8, "logloss": 0.5, "accuracy": 0.7, **{name: 0.1 for name in retrieval_names(10)}}
    graphs = {"replays": 1167, "eager_steps": 3, "other_shapes": 3, "first_other_shape": "19410 rows, not 65536",
              "captured": True, "multi_valued_capacity": 152148}
    print_summary({"test": test, "baselines": {"popularity": test}, "train": {"cuda_graphs": graphs}}, "/out", 10)
    out = capsys.readouterr().out
    assert ("CUDA graphs: 1167 training steps replayed, 3 eager (warm-up), 3 eager for other shapes "
            "(first: 19410 rows, not 65536)") in out
    print_summary({"test": test, "baselines": {"popularity": test}, "train": {"cuda_graphs": None}}, "/out", 10)
    assert "CUDA graphs" not in capsys.readouterr().out
    why = "with several processes every table must be replicated, but t_user is sharded"
    refused = {"captured": False, "refused": why}
    print_summary({"test": test, "baselines": {"popularity": test}, "train": {"cuda_graphs": refused}}, "/out", 10)
    assert f"CUDA graphs: off, {why}" in capsys.readouterr().out
