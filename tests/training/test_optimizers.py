"""Embedding optimizers fused into the backward pass, the dense optimizer, and their schedules
(one gloo process: a real DistributedModelParallel)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.training.conftest import local_state, sharded_module


def _batches(dm, n):
    train = dm.splits["train"]
    rng = np.random.default_rng(0)
    for _ in range(n):
        idx = rng.integers(0, len(train["user"]), 256)
        yield dm.builder.batch(train["user"][idx].astype(np.int64), train["item"][idx].astype(np.int64),
                               train["label"][idx])


@pytest.mark.parametrize("name", ["rowwise_adagrad", "sgd"])
def test_each_cpu_embedding_optimizer_updates_tables_in_backward(process_group, data, name):
    """(Adam on the tables needs FBGEMM's CUDA kernels; it runs in the GPU benchmark.)"""
    from twotower_lit.config import OptimConfig

    lm = sharded_module(data, OptimConfig(embedding_optimizer=name, embedding_lr=0.1), process_group)
    config = lm.configure_optimizers()
    opt = config["optimizer"]
    def table():
        return lm.model.state_dict()["ebc.embedding_bags.t_item.weight"].local_shards()[0].tensor.clone()

    before = table()
    losses = []
    for batch in _batches(data, 20):
        loss = F.binary_cross_entropy_with_logits(lm(batch), batch.labels)
        opt.zero_grad()
        loss.backward()  # the fused embedding update happens here
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(before, table())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # the combined optimizer's state (what checkpoints save) holds both parts
    state = opt.state_dict()["state"]
    assert any("ebc" in k for k in state) and any("tower" in k for k in state)


def test_one_process_keeps_the_dense_towers_out_of_ddp_with_the_same_parameter_names(process_group, data):
    """With nothing to average, DMP is built without its DDP wrapper (`DataParallelAcrossRanks`);
    state dict and optimizer keys stay those of the unwrapped model, as with DDP on several ranks,
    so checkpoints move between process counts."""
    from torch.nn.parallel import DistributedDataParallel

    from twotower_lit.config import OptimConfig

    lm = sharded_module(data, OptimConfig(), process_group)
    assert not any(isinstance(m, DistributedDataParallel) for m in lm.model.modules())
    dense = {k for k in lm.model.state_dict() if not k.startswith("ebc.")}
    assert dense and all(k.startswith(("user_tower.", "item_tower.")) for k in dense), sorted(dense)
    opt = lm.configure_optimizers()["optimizer"]
    assert {k.partition(".")[2] for k in opt.params if k.startswith("dense.")} == dense, sorted(opt.params)


def test_data_parallel_tables_use_the_embedding_optimizer_and_one_closure_per_step(process_group, data):
    """Replicated (data_parallel) tables are not fused into the backward: they get the embedding
    optimizer and learning rate as an optimizer of their own. With it the combined optimizer holds
    two optimizers that would evaluate a closure; Lightning's closure (forward + backward) must
    still run once per step."""
    from twotower_lit.config import OptimConfig
    from twotower_lit.optim import GroupedRowWiseAdagrad

    lm = sharded_module(data, OptimConfig(embedding_lr=0.1, dense_lr=0.01), process_group, sharding="data_parallel")
    opt = lm.configure_optimizers()["optimizer"]
    parts = dict(opt.optimizers)
    assert {"dense", "replicated_tables"} <= set(parts)  # (and an empty fused one)
    tables = parts["replicated_tables"]
    # TorchRec's row-wise Adagrad, stepping every table at once
    assert isinstance(tables._optimizer, GroupedRowWiseAdagrad) and tables.param_groups[0]["lr"] == 0.1
    assert all("embedding_bags." in k for k in tables.params) and len(tables.params) == len(lm.features)
    assert not any("embedding_bags." in k for k in parts["dense"].params)

    def weight():
        return lm.model.state_dict()["ebc.embedding_bags.t_item.weight"].clone()

    before, calls = weight(), []
    for batch in _batches(data, 3):
        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(lm(batch), batch.labels)
            loss.backward()
            return loss

        assert opt.step(closure) is not None
    assert len(calls) == 3
    assert not torch.equal(before, weight())
    assert "ebc.embedding_bags.t_item.weight" in str(list(opt.state_dict()["state"]))


def test_replicated_tables_on_cpu_get_the_gradients_of_a_sum_pooled_embedding_bag(process_group, data):
    """On CPU, backpropagating through the replicated (data_parallel) tables' dense fbgemm lookup
    warns that the op has no autograd kernel and "may lead to silently incorrect behavior". Each
    table's gradient must be what a plain `nn.EmbeddingBag` (sum pooling, the same weights and
    batch) gets for the same upstream gradient."""
    from twotower_lit.config import OptimConfig

    torch.manual_seed(0)
    lm = sharded_module(data, OptimConfig(), process_group, sharding="data_parallel")
    weights = {name: p.detach().clone() for name, p in lm.model.named_parameters() if "embedding_bags." in name}
    params = {name: p for name, p in lm.model.named_parameters() if "embedding_bags." in name}
    assert len(weights) == len(lm.features)
    features = next(_batches(data, 1)).features
    pooled = lm.model.module.ebc(features)  # the sharded collection inside DistributedModelParallel
    pooled = pooled.wait() if hasattr(pooled, "wait") else pooled
    upstream = torch.randn_like(pooled.values())
    (pooled.values() * upstream).sum().backward()
    column = 0
    for key, width in zip(pooled.keys(), pooled.length_per_key()):
        name = next(n for n in weights if n.endswith(f".t_{key}.weight"))
        reference = torch.nn.EmbeddingBag.from_pretrained(weights[name], freeze=False, mode="sum")
        bags = features[key]
        (reference(bags.values(), bags.offsets()[:-1]) * upstream[:, column:column + width]).sum().backward()
        column += width
        torch.testing.assert_close(params[name].grad, reference.weight.grad, msg=f"table t_{key}")
        assert reference.weight.grad.abs().sum() > 0, key  # the batch touched the table
    assert column == upstream.shape[1]


def test_schedule_drives_both_learning_rates(process_group, data):
    from twotower_lit.config import OptimConfig

    lm = sharded_module(data, OptimConfig(lr_schedule="cosine", warmup_steps=2, embedding_lr=0.1, dense_lr=0.01),
                         process_group, total_steps=10)
    config = lm.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for batch in _batches(data, 10):
        loss = F.binary_cross_entropy_with_logits(lm(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        seen.append([g["lr"] for g in opt.param_groups])
    lrs = np.array(seen)  # [step, group]
    assert lrs.shape[1] >= 2
    first, last = lrs[1], lrs[-1]
    # warm-up reached the base rates, cosine decay then shrank every group (embedding and dense)
    assert set(np.round(first, 6)) >= {0.1, 0.01}
    assert (last < first).all() and (last < 1e-3 * first + 0.01 * first).all()


def test_adam_tables_on_cpu_are_refused_up_front(prepared_synthetic, tmp_path):
    from tests.training.conftest import run_cli

    with pytest.raises(AssertionError, match="runs only on GPUs"):
        run_cli("entrypoints.train", ["--data-dir", str(prepared_synthetic), "--output-dir", str(tmp_path),
                                      "--accelerator", "cpu", "--embedding-optimizer", "adam"])
    assert not (tmp_path / "metrics.json").exists()


def test_train_loss_is_logged_as_the_mean_of_each_logging_interval(process_group, data):
    """Lightning shows ``train_loss`` once per ``log_every_n_steps``: the mean of the interval's
    step losses, held on the host (no per-step GPU sync for the progress bar)."""
    import lightning as L

    from twotower_lit.config import OptimConfig

    class Record(L.Callback):
        def __init__(self):
            self.losses, self.shown = [], []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            value = trainer.progress_bar_metrics.get("train_loss")
            self.shown.append(None if value is None else float(value))

    lm = sharded_module(data, OptimConfig(), process_group)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=25, log_every_n_steps=10, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record])
    trainer.fit(lm, train_dataloaders=torch.utils.data.DataLoader(list(_batches(data, 25)), batch_size=None))
    assert record.shown[:9] == [None] * 9  # nothing shown before the first interval is complete
    for end in (10, 20):
        mean = np.mean(record.losses[end - 10:end])
        # shown from the interval's last step until the next interval ends
        assert record.shown[end - 1:end + 9] == pytest.approx([mean] * len(record.shown[end - 1:end + 9]), rel=1e-5)
    assert record.losses[9] != pytest.approx(np.mean(record.losses[:10]), rel=1e-5)  # a mean, not the last loss


def test_lightning_steps_every_optimizer_and_the_schedule_once_per_batch(process_group, data):
    """The module optimises manually: each training step runs one backward, one step of the
    combined optimizer (fused tables and towers), one schedule step, and counts one global step."""
    import lightning as L

    from twotower_lit.config import OptimConfig
    from twotower_lit.optim import lr_lambda

    lm = sharded_module(data, OptimConfig(lr_schedule="linear", embedding_lr=0.1, dense_lr=0.01), process_group,
                         total_steps=10)
    before, backwards = local_state(lm.model), []
    towers = [p for k, p in lm.model.named_parameters() if "tower" in k]
    for p in towers:
        p.register_hook(lambda g: backwards.append(1) or g)
    trained = {}

    class Snapshot(L.Callback):  # the weights as trained, before the trainer's teardown moves the module
        def on_train_end(self, trainer, module):
            trained.update(local_state(lm.model))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshot()])
    trainer.fit(lm, train_dataloaders=torch.utils.data.DataLoader(list(_batches(data, 6)), batch_size=None))
    assert trainer.global_step == 6
    schedule = trainer.lr_scheduler_configs[0].scheduler
    assert schedule.last_epoch == 6
    factor = lr_lambda("linear", 0, 10)(6)
    assert sorted({round(g["lr"], 8) for g in trainer.optimizers[0].param_groups}) == [round(0.01 * factor, 8),
                                                                                      round(0.1 * factor, 8)]
    assert towers and len(backwards) == 6 * len(towers)  # one backward per step
    after = trained
    assert not torch.equal(before["ebc.embedding_bags.t_item.weight"], after["ebc.embedding_bags.t_item.weight"])
    assert all(not torch.equal(before[k], after[k]) for k in before if "tower" in k and k.endswith("weight"))


def test_steps_after_a_calls_first_skip_lightnings_wrappers_only_where_nothing_observes_them(process_group, data):
    """With several steps per call, the steps after each call's first call backward and the
    optimizer directly (`EagerSteps.step`'s ``lean``) and train exactly as Lightning's wrappers do: the same
    weights, step count and learning-rate schedule as one step per call. A callback that
    listens to the per-step hooks turns that off, and then hears every step."""
    import lightning as L

    from twotower_lit.config import OptimConfig
    from twotower_lit.training.steps import EagerSteps

    batches = list(_batches(data, 8))

    class Heard(L.Callback):
        def __init__(self):
            self.steps = 0

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.steps += 1

    def fit(k, callbacks=()):
        torch.manual_seed(0)
        lm = sharded_module(data, OptimConfig(lr_schedule="linear", embedding_lr=0.1, dense_lr=0.01), process_group,
                             total_steps=10, steps=EagerSteps(k))
        flags = []  # whether each optimizer step was lean
        step = lm.steps.step
        lm.steps.step = lambda module, batch, opt, schedule, lean, first: (
            flags.append(lean and not first) or step(module, batch, opt, schedule, lean, first))
        trained = {}

        class Snapshot(L.Callback):
            def on_train_end(self, trainer, module):
                trained.update(local_state(module.model))

        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=8, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshot(), *callbacks])
        trainer.fit(lm, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        schedule = trainer.lr_scheduler_configs[0].scheduler
        lrs = sorted(g["lr"] for g in trainer.optimizers[0].param_groups)
        counted = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total
        assert counted.ready == counted.completed == trainer.global_step  # as Lightning's wrapper counts
        return trained, trainer.global_step, schedule.last_epoch, lrs, sum(flags), lm

    one = fit(1)
    four = fit(4)
    heard = Heard()
    observed = fit(4, [heard])
    assert four[4] == 6  # two calls of four steps: every step but each call's first is lean
    assert observed[4] == 0 and heard.steps == 8
    for run in (four, observed):
        assert run[1:4] == one[1:4] == (8, 8, one[3])
        assert run[0].keys() == one[0].keys()
        for key in one[0]:
            assert torch.equal(run[0][key], one[0][key]), key


def test_checkpoint_of_automatic_optimisation_keeps_its_step_count():
    """A checkpoint written while the module used Lightning's automatic optimisation counts its
    optimizer steps in the automatic loop's state; resumed now, global_step carries over."""
    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.model import FeatureSpec
    from twotower_lit.training.module import TwoTowerModule

    lm = TwoTowerModule([FeatureSpec("user", 5, "user"), FeatureSpec("item", 5, "item")],
                        ModelConfig(embedding_dim=4, user_layers=[4], item_layers=[4], exposure_dims=0), OptimConfig())
    def progress(n):
        return {"total": {"ready": n, "completed": n}, "current": {"ready": n, "completed": n}}

    loop = {"epoch_loop.automatic_optimization.optim_progress": {"optimizer": {"step": progress(37)}},
            "epoch_loop.manual_optimization.optim_step_progress": progress(0)}
    lm.on_load_checkpoint({"loops": {"fit_loop": loop}})
    assert loop["epoch_loop.manual_optimization.optim_step_progress"] == progress(37)


def test_checkpoint_of_another_model_is_refused_naming_the_options():
    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.model import FeatureSpec
    from twotower_lit.training.module import MODEL_KEY, TwoTowerModule

    features = [FeatureSpec("user", 5, "user"), FeatureSpec("item", 5, "item")]

    def module(features=features, **options):
        cfg = dict(embedding_dim=4, user_layers=[8, 4], item_layers=[8, 4], exposure_dims=2)
        return TwoTowerModule(features, ModelConfig(**{**cfg, **options}), OptimConfig())

    checkpoint = {}
    module().on_save_checkpoint(checkpoint)
    assert checkpoint[MODEL_KEY]["options"]["exposure_dims"] == 2
    module().check_resumable(checkpoint, "ckpt")  # the same model resumes
    module().check_resumable({}, "ckpt")  # a checkpoint from before the model was recorded is not checked
    with pytest.raises(ValueError, match=r"--exposure-dims 2 there, 1 here.*--loss both") as err:
        module(exposure_dims=1).check_resumable(checkpoint, "ckpt")
    assert "--embedding-dim" not in str(err.value)
    with pytest.raises(ValueError, match=r"--user-layers 8,4 there, 16,4 here; --item-layers 8,4 there, 16,4 here"):
        module(user_layers=[16, 4], item_layers=[16, 4]).check_resumable(checkpoint, "ckpt")
    with pytest.raises(ValueError, match=r"embedding tables .*'item': 5\} there, .*'item': 7\} here"):
        module(features=[FeatureSpec("user", 5, "user"), FeatureSpec("item", 7, "item")]).check_resumable(
            checkpoint, "ckpt")
