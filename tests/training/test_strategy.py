"""TorchRecStrategy pieces that need no process group."""
import lightning as L
import pytest

from twotower_lit.patches import throttle_sigterm_broadcast


def test_sigterm_broadcast_runs_every_n_steps_on_every_rank_alike():
    loop = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).fit_loop.epoch_loop
    calls = []
    loop._broadcast_sigterm_tensor = lambda: calls.append(loop.total_batch_idx)
    throttle_sigterm_broadcast(loop, 10)
    throttle_sigterm_broadcast(loop, 10)  # idempotent: a second fit does not stack throttles
    for _ in range(35):  # Lightning calls it before each step, then counts the step as ready
        loop._broadcast_sigterm_tensor()
        loop.batch_progress.increment_ready()
    # a pure function of the step count, the same on every rank: steps 0, 10, 20, 30
    assert calls == [-1, 9, 19, 29]


def test_sigterm_broadcast_with_several_steps_per_call_runs_after_each_multiple_crossed():
    loop = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).fit_loop.epoch_loop
    calls = []
    loop._broadcast_sigterm_tensor = lambda: calls.append(loop.total_batch_idx + 1)
    throttle_sigterm_broadcast(loop, 10)
    for _ in range(12):  # --steps-per-execution 3: each call counts 3 batches
        loop._broadcast_sigterm_tensor()
        loop.batch_progress.increment_by(3)
    # batches trained when it ran: at the start, then after 10, 20 and 30 were passed
    assert calls == [0, 12, 21, 30]



def test_small_tables_are_replicated_on_gpus_unless_named_or_resumed():
    from twotower_lit.distributed.planning import table_kinds

    # 64 dims x 4 bytes = 256 bytes a row: 262,144 rows is 64 MB, one row more is over
    tables = {"user": 262_145, "zip": 1_000, "item": 262_144, "year": 100}
    assert table_kinds(tables, 64, "table_wise", {}, replicate_below_mb=64) == {
        "user": "table_wise", "zip": "data_parallel", "item": "data_parallel", "year": "data_parallel"}
    # one GPU, or CPU processes: the plan passes 0
    assert set(table_kinds(tables, 64, "table_wise", {}, replicate_below_mb=0).values()) == {"table_wise"}
    # --table-sharding wins over the size rule
    assert table_kinds(tables, 64, "auto", {"item": "row_wise"}, replicate_below_mb=64) == {
        "user": "auto", "item": "row_wise", "zip": "data_parallel", "year": "data_parallel"}
    # resuming keeps the checkpoint's replicated tables, and replicates nothing else by size
    assert table_kinds(tables, 64, "table_wise", {"year": "table_wise"}, replicate_below_mb=64,
                       resumed_replicated=["t_user", "t_year"]) == {
        "user": "data_parallel", "zip": "table_wise", "item": "table_wise", "year": "table_wise"}
    with pytest.raises(ValueError, match=r"--table-sharding names unknown feature\(s\) \['genre'\]"):
        table_kinds(tables, 64, "table_wise", {"genre": "row_wise"})


def test_input_dist_permutation_is_built_once_per_argument_set_with_torchrecs_values():
    import torch
    from torchrec.distributed import dist_data

    from twotower_lit.patches import cache_input_dist_permutations

    cache_input_dist_permutations()
    cache_input_dist_permutations()  # idempotent: one wrapper, not a wrapper of a wrapper
    cached = dist_data._get_recat
    original = cached.__wrapped__
    assert not getattr(original, "cached", False)
    cpu = torch.device("cpu")
    for args in [(2, 4, 1, cpu, None), (3, 2, 1, cpu, [5, 5]), (2, 4, 2, cpu, [3, 5, 3, 5]), (1, 1, 1, cpu, None)]:
        first = cached(*args)
        assert cached(local_split=args[0], num_splits=args[1], stagger=args[2], device=args[3],
                      batch_size_per_rank=args[4]) is first  # reused, keywords as TorchRec passes them
        assert torch.equal(first, original(*args)), args
    assert cached(0, 4) is None  # an empty local split has no permutation


class _Shardable(L.LightningModule):
    def __init__(self):
        super().__init__()
        import torch

        self.model = torch.nn.Linear(2, 2, device="meta")  # a submodule, as the job's tables are

    def on_sharded(self, parts):
        pass

    def check_resumable(self, checkpoint, path):
        pass


def test_a_lightning_module_with_the_members_is_shardable_and_one_without_is_named():
    from twotower_lit.sharded import require_shardable

    module = _Shardable()
    assert require_shardable(module) is module
    with pytest.raises(TypeError, match=r"LightningModule does not implement twotower_lit.sharded.ShardableModule: "
                                        r"it has no model, on_sharded, check_resumable"):
        require_shardable(L.LightningModule())


_STOPS_BEFORE_SHARDING = """
import lightning as L, torch
from twotower_lit.distributed import TorchRecStrategy

class NoHooks(L.LightningModule):  # its tables on meta, as the job's are until DMP shards them
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(2, 2, device="meta")

    def training_step(self, batch):
        return self.model(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

trainer = L.Trainer(strategy=TorchRecStrategy(), accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, enable_checkpointing=False, max_epochs=1)
try:
    trainer.fit(NoHooks(), train_dataloaders=[torch.zeros(1)])
except Exception as e:
    print("raised", type(e).__name__, e)
"""


def test_a_setup_that_stops_before_sharding_raises_its_own_error_not_one_of_teardown():
    """Lightning's teardown moves the module to the CPU, which tables still on meta cannot do: the
    strategy's teardown skips that move, so the error that stopped setup is the one raised.
    (A subprocess: the strategy starts a process group and sets MASTER_PORT.)"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _STOPS_BEFORE_SHARDING], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "raised TypeError NoHooks does not implement twotower_lit.sharded.ShardableModule: it has no " \
           "on_sharded, check_resumable" in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    assert "meta" not in proc.stdout
