"""Fixtures for training tests: a prepared synthetic dataset and a helper to run the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(module: str, args: List[str], timeout: int = 600,
            env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` from the repository root; fail with its output on error."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_json(path) -> Dict:
    with open(path) as f:
        return json.load(f)


def prepare_synthetic(synthetic_movielens, tmp_path_factory, ratings: int, seed: int) -> Path:
    """A prepared ml-1m-layout synthetic set of `ratings` ratings in at least 4 shards."""
    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.prepare import prepare_dataset

    raw = synthetic_movielens("ml-1m", ratings, seed=seed)
    out = tmp_path_factory.mktemp("prepared") / f"ml-1m-{ratings // 1000}k"
    prepare_dataset(PrepareConfig(data_dir=str(raw), min_shards=4), str(out), log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def prepared_synthetic(synthetic_movielens, tmp_path_factory) -> Path:
    """A prepared ml-1m-layout synthetic dataset (~30k ratings) shared by the training tests."""
    return prepare_synthetic(synthetic_movielens, tmp_path_factory, 30_000, seed=1)


TRAIN_ARGS = ["--max-epochs", "2", "--batch-size", "512", "--progress", "false", "--negatives", "2"]


@pytest.fixture(scope="module")
def process_group():
    """One gloo process (a real DistributedModelParallel in the test process). A TCP store on a
    free port, passed explicitly: nothing leaks into the environment that the training
    subprocesses of other tests inherit (an inherited MASTER_PORT would be taken)."""
    import torch.distributed as dist

    from tests.conftest import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def data(prepared_synthetic):
    """The prepared synthetic set, loaded (feature tables, splits), batches of 256."""
    from twotower_lit.data.datamodule import MovieLensDataModule

    dm = MovieLensDataModule(str(prepared_synthetic), batch_size=256)
    dm.load()
    return dm


def sharded_module(dm, optim_cfg, pg, total_steps=10, sharding="table_wise", kinds=None, **options):
    """A small TwoTowerModule of `dm`'s features with its model under DMP on CPU (every table
    `sharding`, or as `kinds` names it), its parts handed over as the strategy hands them."""
    import torch

    from twotower_lit.config import ModelConfig
    from twotower_lit.distributed.sharding import shard_module
    from twotower_lit.model import feature_specs
    from twotower_lit.training.module import TwoTowerModule

    cfg = ModelConfig(embedding_dim=8, user_layers=[16, 8], item_layers=[16, 8], exposure_dims=0)
    lm = TwoTowerModule(feature_specs(dm.manifest), cfg, optim_cfg, total_steps, **options)
    shard_module(lm, pg, torch.device("cpu"), kinds, default=sharding)
    return lm


def local_state(model):
    """A copy of `model`'s state dict, each sharded table as this rank's shard."""
    return {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).clone()
            for k, v in model.state_dict().items()}
