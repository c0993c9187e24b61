"""Resuming an epoch mid-way on another number of processes or batch size trains the rows the
checkpoint had not trained, each once: the readers of every simulated rank driven as the
trainer drives them, and a real 1 -> 2 process gloo run whose trained rows a Lightning callback
records."""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

from tests.training.conftest import REPO, read_json

B = 256  # batch size of the checkpoint's layout in most cases

Rows = List[Tuple[int, int, bool]]  # (user, item, read for the first time this epoch) of each trained row


def _rows(batch) -> Rows:
    d = batch.features.to_dict()
    return list(zip(d["user"].values().tolist(), d["item"].values().tolist(), batch.rated.tolist()))


def _loader(dm, reader_kind: str, world: int, rank: int, batch_size: int, epoch: int):
    """Rank `rank` of `world`'s training loader, built as `MovieLensDataModule` builds it and
    resumed by the data module's own `_resume`."""
    from twotower_lit.data.device_batches import DeviceResidentBatches
    from twotower_lit.data.loader import EpochAwareDataLoader, RatingsShardReader

    if reader_kind == "device":
        reader = DeviceResidentBatches(dm.splits["train"], dm.source("train").rows, dm.builder, batch_size,
                                       world=world, rank=rank, seed=dm.seed, device=torch.device("cpu"))
    else:
        reader = RatingsShardReader(dm.source("train"), dm.builder, batch_size, world=world, rank=rank, seed=dm.seed,
                                    buffer_rows=dm.buffer_rows)
    return EpochAwareDataLoader(reader, epoch_fn=lambda: epoch, resume_fn=dm._resume)


def _state(epoch: int, layouts: Sequence[Tuple[int, int, int]], on_device: bool) -> Dict:
    """What a checkpoint of `layouts` (world, batch size, batches) within `epoch` records (the
    real `state_dict` is checked by the multi-process test below)."""
    state = {"epoch": epoch, "train_batches_done": sum(n for *_, n in layouts), "data_on_device": on_device,
             "seed": 0, "layouts": [{"world": w, "batch_size": b, "batches": n} for w, b, n in layouts]}
    if on_device:
        state["device"] = "cpu"
    return state


def _train_layouts(dm, reader_kind: str, layouts: Sequence[Tuple[int, int, int]], epoch: int = 0):
    """The rows each layout's ranks train, each layout resumed from the checkpoint of the ones
    before it, the last one to the end of the epoch; and the last layout's batch counts per rank."""
    trained: Rows = []
    for i, (world, batch_size, batches) in enumerate(layouts):
        last = i == len(layouts) - 1
        counts = []
        for rank in range(world):
            dm.load_state_dict(_state(epoch, layouts[:i], reader_kind == "device"))
            loader = _loader(dm, reader_kind, world, rank, batch_size, epoch)
            taken = [_rows(batch) for b, batch in zip(range(10**9 if last else batches), loader)]
            counts.append(len(taken))
            trained.extend(row for rows in taken for row in rows)
    return trained, counts


def _check_every_row_once(dm, trained: Rows, extra_reads: int) -> None:
    """Every training row trained, none read for the first time twice, and no more re-reads than
    the wrap-around ones of rule 2 of the loader's policy."""
    split = dm.splits["train"]
    expected = collections.Counter(zip(split["user"].tolist(), split["item"].tolist()))
    assert max(expected.values()) == 1  # (user, item) names a training row
    reads = collections.Counter((u, i) for u, i, _ in trained)
    first = collections.Counter((u, i) for u, i, flag in trained if flag)
    assert set(reads) == set(expected), "rows left out or rows from elsewhere"
    assert max(first.values()) == 1, "a row read for the first time twice"
    assert sum(reads.values()) - len(expected) <= extra_reads
    assert len(trained) - sum(first.values()) <= extra_reads


@pytest.fixture(scope="module")
def modules(prepared_synthetic):
    """A data module per training reader, each loaded."""
    from twotower_lit.data.datamodule import MovieLensDataModule

    out = {}
    for kind in ("streaming", "device"):
        out[kind] = MovieLensDataModule(str(prepared_synthetic), batch_size=B, data_on_device=kind == "device")
        out[kind].load()
    return out


@pytest.fixture(scope="module")
def dm(modules):
    return modules["streaming"]


@pytest.mark.parametrize("reader_kind", ["streaming", "device"])
@pytest.mark.parametrize("layouts", [
    [(1, B, 50), (2, B, 0)],  # 1 -> 2 processes
    [(2, B, 30), (1, B, 0)],  # 2 -> 1
    [(2, B, 21), (3, B, 0)],  # 2 -> 3
    [(1, B, 40), (1, 100, 0)],  # another batch size
    [(1, B, 17), (2, 300, 9), (3, 200, 0)],  # resumed twice within the epoch
], ids=["1to2", "2to1", "2to3", "batch256to100", "1to2to3"])
def test_a_resumed_epoch_on_another_layout_trains_every_row_once(modules, reader_kind, layouts):
    dm = modules[reader_kind]
    trained, counts = _train_layouts(dm, reader_kind, layouts)
    assert len(set(counts)) == 1, f"ranks would step a different number of batches: {counts}"
    _check_every_row_once(dm, trained, extra_reads=sum(w - 1 for w, _, _ in layouts))


@pytest.mark.parametrize("reader_kind", ["streaming", "device"])
def test_fewer_rows_left_than_ranks_wrap_around_on_every_rank(modules, reader_kind):
    """One row left for three ranks: each trains it (one batch each), and the epoch is complete."""
    dm = modules[reader_kind]
    n = len(dm.splits["train"]["user"])
    trained, counts = _train_layouts(dm, reader_kind, [(1, n - 1, 1), (3, B, 0)])
    assert counts == [1, 1, 1]
    _check_every_row_once(dm, trained, extra_reads=2)


@pytest.mark.parametrize("reader_kind", ["streaming", "device"])
def test_the_next_epoch_is_an_uninterrupted_runs_and_the_same_layout_continues_exactly(modules, reader_kind):
    """After a resumed epoch the loader trains the next epoch as a run that never stopped; resumed
    on the checkpoint's own layout, an epoch goes on with exactly the batches it would have had."""
    dm = modules[reader_kind]
    epoch = 1
    dm.load_state_dict(_state(epoch, [(1, B, 12)], reader_kind == "device"))
    loader = _loader(dm, reader_kind, 2, 1, B, epoch)
    assert list(loader)  # the rest of the resumed epoch
    loader._epoch_fn = lambda: epoch + 1
    fresh = _loader(dm, reader_kind, 2, 1, B, epoch + 1)
    assert [_rows(b) for b in loader] == [_rows(b) for b in fresh]

    uninterrupted = [_rows(b) for b in _loader(dm, reader_kind, 2, 0, B, epoch)]
    dm.load_state_dict(_state(epoch, [(2, B, 7)], reader_kind == "device"))
    assert [_rows(b) for b in _loader(dm, reader_kind, 2, 0, B, epoch)] == uninterrupted[7:]


def test_a_checkpoint_without_layouts_resumes_only_where_it_can_have_been_written(dm):
    """A mid-epoch checkpoint of an earlier version records batches only: it continues on this
    run's layout, and one that cannot have been written with it is refused."""
    full = [_rows(b) for b in _loader(dm, "streaming", 1, 0, B, 0)]
    dm.load_state_dict({"epoch": 0, "train_batches_done": 9, "data_on_device": False})
    assert [_rows(b) for b in _loader(dm, "streaming", 1, 0, B, 0)] == full[9:]
    two = len(_loader(dm, "streaming", 2, 0, B, 0))
    dm.load_state_dict({"epoch": 0, "train_batches_done": two + 1, "data_on_device": False})
    with pytest.raises(ValueError, match=rf"stopped {two + 1} batches into epoch 0, more than the {two} of an epoch "
                                         rf"here \(2 processes, --batch-size {B}\).*resume it with those"):
        list(_loader(dm, "streaming", 2, 0, B, 0))


def test_a_mid_epoch_checkpoint_refuses_another_seed_or_device_generator(modules):
    dm = modules["streaming"]
    dm.load_state_dict({**_state(0, [(1, B, 5)], False), "seed": 7})
    with pytest.raises(ValueError, match="with --seed 7, which orders the epoch's rows; resume it with --seed 7"):
        list(_loader(dm, "streaming", 2, 0, B, 0))
    dm = modules["device"]
    dm.load_state_dict({**_state(0, [(1, B, 5)], True), "device": "cuda"})
    with pytest.raises(ValueError, match="built on cuda, whose random generator orders the epoch's rows otherwise "
                                         "than cpu's: resume it on cuda"):
        list(_loader(dm, "device", 2, 0, B, 0))


@pytest.mark.parametrize("layout", [{"world": 0, "batch_size": B, "batches": 3}, {"world": 1, "batches": 3},
                                    {"world": 1, "batch_size": "256", "batches": 3}, [1, B, 3]])
def test_a_malformed_layout_record_is_refused_naming_it(dm, layout):
    dm.load_state_dict({**_state(0, [], False), "layouts": [layout]})
    with pytest.raises(ValueError, match=r"records the layout .*expected \{'world': >= 1"):
        list(_loader(dm, "streaming", 2, 0, B, 0))


# ---------------------------------------------------------------------------------------------
# a real run: 1 process to a mid-epoch checkpoint, resumed on 2 gloo processes

RECORDER = textwrap.dedent('''
    """Records the rows of every training batch, per rank, for tests (a Lightning callback
    registered through Lightning's `lightning.pytorch.callbacks_factory` entry points)."""
    import json
    import os

    import lightning as L


    class RowRecorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            d = batch.features.to_dict()
            line = {"epoch": trainer.current_epoch, "batch_idx": batch_idx, "world": trainer.world_size,
                    "users": d["user"].values().tolist(), "items": d["item"].values().tolist(),
                    "rated": batch.rated.tolist()}
            path = os.path.join(os.environ["ROW_RECORDER_DIR"], f"rank{trainer.global_rank}.jsonl")
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\\n")


    def callbacks():
        return [RowRecorder()] if os.environ.get("ROW_RECORDER_DIR") else []
''')


@pytest.fixture(scope="module")
def recorder_path(tmp_path_factory) -> Path:
    """A directory to put on PYTHONPATH that registers `RowRecorder` with Lightning."""
    root = tmp_path_factory.mktemp("recorder")
    (root / "row_recorder.py").write_text(RECORDER)
    info = root / "row_recorder-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: row-recorder\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lightning.pytorch.callbacks_factory]\nrows = row_recorder:callbacks\n")
    return root


def _recorded(directory: Path) -> List[Dict]:
    lines = []
    for path in sorted(directory.glob("rank*.jsonl")):
        rank = int(re.search(r"rank(\d+)", path.name).group(1))
        lines += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines()]
    return lines


class Runs:
    """Real training runs of the prepared set with a `RowRecorder` (small towers; `batch_size`
    gives an even number of batches per epoch on one process)."""

    def __init__(self, data: Path, recorder: Path, n_rows: int) -> None:
        self.batch_size = next(b for b in range(B, 2 * B) if -(-n_rows // b) % 2 == 0)
        self.one_epoch = -(-n_rows // self.batch_size)
        self.two_epoch = -(-(-(-n_rows // 2)) // self.batch_size)
        self.recorder = recorder
        self.args = ["--data-dir", str(data), "--accelerator", "cpu", "--batch-size", str(self.batch_size),
                     "--progress", "false", "--negatives", "0", "--registered-model-name", "", "--mlflow-uri", "",
                     "--embedding-dim", "8", "--user-layers", "8", "--item-layers", "8", "--exposure-dims", "4"]

    def train(self, out: Path, devices: int, *extra: str) -> Dict:
        (out / "rows").mkdir(parents=True)
        env = dict(os.environ, ROW_RECORDER_DIR=str(out / "rows"),
                   PYTHONPATH=os.pathsep.join([str(REPO), str(self.recorder)]))
        proc = subprocess.run([sys.executable, "-m", "entrypoints.train", *self.args, "--output-dir", str(out),
                               "--devices", str(devices), *extra], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return read_json(out / "metrics.json")

    def epoch_rows(self, dm, world: int, rank: int, epoch: int) -> List[Tuple[List[int], List[int]]]:
        """(users, items) of each batch of an epoch that no resume touched, from the reader itself."""
        from twotower_lit.data.loader import RatingsShardReader

        reader = RatingsShardReader(dm.source("train"), dm.builder, self.batch_size, world=world, rank=rank,
                                    seed=dm.seed, buffer_rows=dm.buffer_rows)
        reader.set_epoch(epoch)
        return [(b.features.to_dict()["user"].values().tolist(), b.features.to_dict()["item"].values().tolist())
                for b in reader]


@pytest.fixture(scope="module")
def one_process_run(dm, prepared_synthetic, recorder_path, tmp_path_factory):
    """One epoch on one process, a checkpoint in its middle and one after its last batch."""
    runs = Runs(prepared_synthetic, recorder_path, len(dm.splits["train"]["user"]))
    out = tmp_path_factory.mktemp("one-process")
    runs.train(out, 1, "--max-epochs", "1", "--checkpoint-every-n-steps", str(runs.one_epoch // 2))
    return runs, out


def test_one_process_checkpoint_resumed_on_two_processes_trains_the_rest_of_the_epoch(dm, one_process_run, tmp_path):
    runs, first = one_process_run
    step = runs.one_epoch // 2
    checkpoint = first / "checkpoints" / f"epoch0-step{step}.ckpt"
    metrics = runs.train(tmp_path, 2, "--max-epochs", "2", "--resume", str(checkpoint))
    before = [r for r in _recorded(first / "rows") if r["batch_idx"] < step]
    after = _recorded(tmp_path / "rows")
    assert len(before) == step and {r["world"] for r in after} == {2}

    # epoch 0: the checkpoint's batches and the 2 ranks' rest: every row once
    resumed = [r for r in after if r["epoch"] == 0]
    trained = [row for r in before + resumed for row in zip(r["users"], r["items"], r["rated"])]
    _check_every_row_once(dm, trained, extra_reads=1)
    # the same number of batches on both ranks, numbered by Lightning up to the end of a 2-process epoch
    for rank in (0, 1):
        idx = [r["batch_idx"] for r in resumed if r["rank"] == rank]
        assert idx == list(range(runs.two_epoch - len(idx), runs.two_epoch)), idx
    assert len([r for r in resumed if r["rank"] == 0]) == len([r for r in resumed if r["rank"] == 1])

    # epoch 1: a whole 2-process epoch, as a run that never stopped trains it
    for rank in (0, 1):
        got = [(r["users"], r["items"]) for r in after if r["epoch"] == 1 and r["rank"] == rank]
        assert got == runs.epoch_rows(dm, 2, rank, 1)
    assert metrics["train"]["steps"] == step + len(resumed) // 2 + runs.two_epoch


def test_a_checkpoint_after_an_epochs_last_batch_resumes_at_the_next_epoch(dm, one_process_run, tmp_path):
    """The step checkpoint written after the first epoch's last batch: the resumed run trains the
    whole second epoch (Lightning, left to itself, would carry the finished epoch's data iterator
    into it and train nothing)."""
    runs, first = one_process_run
    checkpoint = first / "checkpoints" / f"epoch0-step{runs.one_epoch}.ckpt"
    metrics = runs.train(tmp_path, 1, "--max-epochs", "2", "--resume", str(checkpoint))
    after = _recorded(tmp_path / "rows")
    assert {r["epoch"] for r in after} == {1}
    assert [r["batch_idx"] for r in after] == list(range(runs.one_epoch))
    assert [(r["users"], r["items"]) for r in after] == runs.epoch_rows(dm, 1, 0, 1)
    assert metrics["train"]["steps"] == 2 * runs.one_epoch
