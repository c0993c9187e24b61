"""LightningDataModule over a prepared dataset: per-rank shard streaming plus the evaluation data."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from twotower_lit.data.batches import FeatureTables, KJTBuilder
from twotower_lit.data.csr import Csr, positives_csr
from twotower_lit.data.device_batches import DeviceResidentBatches
from twotower_lit.data.loader import (EpochAwareDataLoader, Layout, RatingsShardReader, ResumableEpoch,
                                      ShardSource, num_batches, read_columns, resume_epoch)
from twotower_lit.data.negatives import NegativeSampler, negative_probabilities
from twotower_lit.data.storage import Storage
from twotower_lit.data.schema import ITEMS_FILE, MANIFEST, MULTI_VALUED, SCHEMA_VERSION, SPLITS, USERS_FILE


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def load_manifest(data_dir: str) -> Dict:
    """The prepared dataset's manifest (local or s3://), with a clear error if it is not one."""
    path = join(data_dir, MANIFEST)
    try:
        manifest = json.loads(Storage(data_dir).read_bytes(MANIFEST).decode())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a prepared dataset; run "
                                f"`python -m entrypoints.prepare --data-dir RAW --output-dir {data_dir}`") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')!r}, this code reads "
                         f"{SCHEMA_VERSION}; prepare the data again")
    return manifest


def split_source(data_dir: str, manifest: Dict, split: str) -> ShardSource:
    """The shards of one split as the manifest lists them (paths and row counts)."""
    files = sorted((name, meta) for name, meta in manifest["files"].items()
                   if name.startswith(f"{split}/") and name.endswith(".parquet"))
    if not files:
        raise ValueError(f"{data_dir}: the manifest lists no shards of split {split!r}")
    return ShardSource([join(data_dir, name) for name, _ in files], [int(m["rows"]) for _, m in files])


def genre_ids_from_one(data_dir: str, manifest: Dict) -> bool:
    """Whether the multi-valued item features' ids start at 1, leaving row 0 of their tables free
    (a CUDA-graphed step pads with it). True for data this project prepares; checked for other data."""
    names = [f for f in manifest["item_features"] if f in MULTI_VALUED]
    if not names:
        return True
    table = read_columns(join(data_dir, ITEMS_FILE), names)
    for name in names:
        values = table.column(name).combine_chunks().flatten()
        if len(values) and pc.min(values).as_py() < 1:
            return False
    return True


def read_split(data_dir: str, manifest: Dict, split: str) -> Dict[str, np.ndarray]:
    """All rows of a split (user, item, label), in shard order."""
    table = pa.concat_tables([read_columns(p, ("user", "item", "label"))
                              for p in split_source(data_dir, manifest, split).paths])
    return {c: table.column(c).to_numpy() for c in ("user", "item", "label")}


class MovieLensDataModule(L.LightningDataModule):
    """Streams a prepared MovieLens dataset; each rank reads only its own rows of every split.

    Besides the loaders it holds what evaluation needs on every rank: the training items of each
    user (`seen`, also used to draw negatives) and the held-out positives per split.
    """

    def __init__(self, data_dir: str, batch_size: int = 1024, eval_batch_size: int = 8192, negatives: int = 0,
                 negative_sampling: str = "uniform", negative_power: float = 1.0, seed: int = 0,
                 num_workers: int = 0, side_features: bool = True, buffer_rows: int = 1 << 18,
                 data_on_device: bool = False, manifest: Optional[Dict] = None) -> None:
        super().__init__()
        if data_on_device and negatives:
            raise ValueError(f"--data-on-device builds batches of rated rows only; --negatives {negatives} needs the "
                             f"streaming loader: drop --data-on-device or pass --negatives 0")
        self.data_on_device = data_on_device
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.negatives = negatives
        self.negative_sampling = negative_sampling
        self.negative_power = negative_power
        self.seed = seed
        self.num_workers = num_workers
        self.buffer_rows = buffer_rows
        self._resume_state: Optional[Dict] = None  # the data module state of the checkpoint resumed, until taken
        # (epoch, layouts before this run's, Lightning's batch count where this run's began) when
        # this run resumed within an epoch
        self._resumed: Optional[Tuple[int, List[Layout], int]] = None
        self.manifest = manifest if manifest is not None else load_manifest(data_dir)  # (the job has read it)
        sizes = self.manifest["vocab_sizes"]
        self.num_users, self.num_items = int(sizes["user"]), int(sizes["item"])
        self.user_features = [f for f in self.manifest["user_features"] if side_features or f == "user"]
        self.item_features = [f for f in self.manifest["item_features"] if side_features or f == "item"]
        self._loaded = False

    # ------------------------------------------------------------------ data
    def source(self, split: str) -> ShardSource:
        return split_source(self.data_dir, self.manifest, split)

    def read_split(self, split: str) -> Dict[str, np.ndarray]:
        return read_split(self.data_dir, self.manifest, split)

    def load(self) -> None:
        """Feature tables, training pairs and held-out positives (idempotent)."""
        if self._loaded:
            return
        users = read_columns(join(self.data_dir, USERS_FILE), self.user_features)
        items = read_columns(join(self.data_dir, ITEMS_FILE), self.item_features)
        self.tables = FeatureTables.from_frames(users, items, self.num_users, self.num_items,
                                                self.user_features, self.item_features)
        self.builder = KJTBuilder(self.tables, self.user_features, self.item_features)
        self.splits = {s: self.read_split(s) for s in SPLITS}
        train = self.splits["train"]
        self.seen = Csr.from_pairs(train["user"].astype(np.int64), train["item"].astype(np.int64), self.num_users)
        self.positives = {s: positives_csr(self.splits[s]["user"].astype(np.int64),
                                           self.splits[s]["item"].astype(np.int64), self.splits[s]["label"],
                                           self.num_users) for s in ("val", "test")}
        self.item_counts = np.bincount(train["item"], minlength=self.num_items)
        # what the loader draws negatives by, and what the softmax corrects them by
        self.negative_probabilities = negative_probabilities(self.num_items, self.negative_sampling,
                                                             self.item_counts, self.negative_power)
        self._loaded = True

    def setup(self, stage: Optional[str] = None) -> None:
        self.load()

    # ------------------------------------------------------------------ loaders
    def _world(self):
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loader(self, split: str, train: bool) -> EpochAwareDataLoader:
        world, rank = self._world()
        sampler = None
        if train and self.negatives:
            sampler = NegativeSampler(self.seen.keys(self.num_items), self.num_items, self.negative_sampling,
                                      self.item_counts, power=self.negative_power)
        reader = RatingsShardReader(self.source(split), self.builder,
                                    self.batch_size if train else self.eval_batch_size, world=world, rank=rank,
                                    seed=self.seed, shuffle=train, buffer_rows=self.buffer_rows,
                                    negatives=self.negatives if train else 0, sampler=sampler)
        pin = bool(self.trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        return EpochAwareDataLoader(
            reader, epoch_fn=self._current_epoch,
            resume_fn=self._resume if train else None,
            num_workers=self.num_workers, pin_memory=pin,
            prefetch_factor=4 if self.num_workers else None, persistent_workers=False)

    def train_dataloader(self):
        if self.data_on_device:
            return self._device_loader()
        return self._loader("train", train=True)

    def _device_loader(self) -> EpochAwareDataLoader:
        """Training batches built on the training device from a copy of the split kept there."""
        world, rank = self._world()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        batches = DeviceResidentBatches(self.splits["train"], self.source("train").rows, self.builder,
                                        self.batch_size, world=world, rank=rank, seed=self.seed, device=device)
        return EpochAwareDataLoader(
            batches, epoch_fn=self._current_epoch,
            resume_fn=self._resume, num_workers=0, pin_memory=False)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("test", train=False)

    # ------------------------------------------------------------------ mid-epoch resume
    def state_dict(self) -> Dict:
        """Saved in every checkpoint: how far into the epoch training got, as what determines the
        rows trained so far: the training reader, its seed (and for batches built on the device,
        the device type, whose generator orders them) and the layouts that trained the epoch,
        each as world size, per-rank batch size and batches (several after a resume on another
        layout within the epoch; JSON values only)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        epoch = trainer.current_epoch
        # `ready` counts batches handed to training_step so far this epoch; checkpoints are written
        # after the step (on_train_batch_end) or at the epoch end
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        # resumed within this epoch: the layouts before this run's, and the count where this run's began
        earlier, start = self._resumed[1:] if self._resumed and self._resumed[0] == epoch else ([], 0)
        layouts = [*earlier, (trainer.world_size, self.batch_size, done - start)]
        state = {"epoch": epoch, "train_batches_done": done, "data_on_device": self.data_on_device,
                 "seed": self.seed, "layouts": [{"world": w, "batch_size": b, "batches": n} for w, b, n in layouts]}
        if self.data_on_device:
            state["device"] = trainer.strategy.root_device.type
        return state

    def load_state_dict(self, state: Dict) -> None:
        self._resume_state = dict(state)

    def _resume(self, reader: ResumableEpoch) -> None:
        """Set the training reader to continue the epoch of the resumed checkpoint where it stopped
        (once, and only in that epoch), and Lightning's count of the epoch's batches to match."""
        epoch = reader.epoch
        layouts = self._take_resume_layouts(epoch, reader)
        if not layouts:
            return
        earlier, skip = resume_epoch(reader, layouts)
        # Lightning ends the epoch when its count of batches reaches the loader's length, a whole
        # epoch of this layout: start the count where the batches left end on exactly that (its
        # counters move together, so its checks of where a checkpoint was written still hold)
        count = len(reader) - (reader.epoch_batches() - skip)
        self._resumed = (epoch, earlier, count - skip)
        if self.trainer is not None:
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            shift = count - progress.ready
            for name in ("ready", "started", "processed", "completed"):
                setattr(progress, name, getattr(progress, name) + shift)

    def _take_resume_layouts(self, epoch: int, reader: ResumableEpoch) -> List[Layout]:
        """The layouts that trained the first batches of `epoch` in the resumed checkpoint (none
        unless it stopped within this epoch). Refuses what would repeat some rows and leave out
        others for the rest of the epoch: the other training reader than the checkpoint's (the
        two order an epoch's rows differently), another seed, batches built on another device
        type, and a checkpoint written before layouts were recorded on another layout than it
        must have had."""
        state, self._resume_state = self._resume_state, None
        if not state or state.get("epoch") != epoch:
            return []
        if "layouts" in state:
            layouts = [self._layout(entry) for entry in state["layouts"]]
        else:  # written before layouts were recorded: only this run's layout can continue it
            done = int(state.get("train_batches_done", 0))
            if done > len(reader):
                raise ValueError(
                    f"the checkpoint stopped {done} batches into epoch {epoch}, more than the {len(reader)} of an "
                    f"epoch here ({reader.world} processes, --batch-size {reader.batch_size}), and it does not record "
                    f"the process count and batch size it was written with (an earlier version): resume it with "
                    f"those, or from an epoch-end checkpoint")
            layouts = [(reader.world, reader.batch_size, done)]
        done = sum(n for _, _, n in layouts)
        if not done:
            return []
        saved = state.get("data_on_device")
        if saved is not None and bool(saved) != self.data_on_device:
            def how(on_device: bool) -> str:
                return "built on the device" if on_device else "streamed from the shards"

            raise ValueError(
                f"the checkpoint stopped {done} batches into epoch {epoch} with its training batches "
                f"{how(bool(saved))}, and this run's are {how(self.data_on_device)}: their row orders differ, "
                f"so the rest of the epoch would repeat some rows and skip others. Resume with --data-on-device "
                f"{str(bool(saved)).lower()}, or from an epoch-end checkpoint")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint stopped {done} batches into epoch {epoch} with --seed {state['seed']}, "
                             f"which orders the epoch's rows; resume it with --seed {state['seed']}, or from an "
                             f"epoch-end checkpoint")
        device = getattr(reader, "device", None)
        if "device" in state and device is not None and state["device"] != device.type:
            raise ValueError(f"the checkpoint stopped {done} batches into epoch {epoch} with training batches built "
                             f"on {state['device']}, whose random generator orders the epoch's rows otherwise than "
                             f"{device.type}'s: resume it on {state['device']}, or from an "
                             f"epoch-end checkpoint")
        return layouts

    @staticmethod
    def _layout(entry) -> Layout:
        """(world, batch size, batches) of one recorded layout, checked."""
        keys = ("world", "batch_size", "batches")
        if (not isinstance(entry, dict) or any(type(entry.get(k)) is not int for k in keys)
                or entry["world"] < 1 or entry["batch_size"] < 1 or entry["batches"] < 0):
            raise ValueError(f"the checkpoint's data module state records the layout {entry!r}; expected "
                             f"{{'world': >= 1, 'batch_size': >= 1, 'batches': >= 0}}: resume from another checkpoint")
        return entry["world"], entry["batch_size"], entry["batches"]

    def steps_per_epoch(self, world: int) -> int:
        return num_batches(self.source("train").total_rows, world, self.batch_size)
