"""The GPU suite (`pytest -m gpu tests/gpu`): what only runs on a GPU, checked on one.

Every test here is marked ``gpu`` and skipped, at collection, where no CUDA device is visible.
``TWOTOWER_GPU_SUITE_ON_CPU=1`` runs the suite's logic on CPU instead (no capture, no TF32):
a way to debug the tests themselves on a machine without a GPU, not a substitute for the GPU run.
Nothing CUDA-only is imported at module level, so collecting this directory on CPU is cheap.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ON_CPU = os.environ.get("TWOTOWER_GPU_SUITE_ON_CPU") == "1"
SKIP_REASON = ("no CUDA GPU visible (torch.cuda.is_available() is false): the GPU suite runs on a GPU machine "
               "(scripts/gpu-tests.sh); TWOTOWER_GPU_SUITE_ON_CPU=1 runs its logic on CPU")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # this hook sees the whole session's items: only this directory's are marked and skipped
    mine = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    if not mine:
        return
    skip = None if ON_CPU or _cuda() else pytest.mark.skip(reason=SKIP_REASON)
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    import torch

    return torch.device("cpu") if ON_CPU else torch.device("cuda", 0)


@pytest.fixture(scope="session")
def gpu_prepared(synthetic_movielens, tmp_path_factory) -> Path:
    """A prepared ml-1m-layout synthetic set of 20k ratings in 4 shards: small enough for seconds per run."""
    from tests.training.conftest import prepare_synthetic

    return prepare_synthetic(synthetic_movielens, tmp_path_factory, 20_000, seed=3)


@pytest.fixture(scope="module")
def gpu_data(gpu_prepared):
    """The prepared set, loaded (feature tables, splits)."""
    from twotower_lit.data.datamodule import MovieLensDataModule

    dm = MovieLensDataModule(str(gpu_prepared), batch_size=1024)
    dm.load()
    return dm


@pytest.fixture(scope="module")
def device_group(device):
    """A one-process group for DistributedModelParallel in the test process: NCCL on the GPU
    (what the training job uses there), gloo on CPU. The store is passed explicitly so that no
    MASTER_PORT leaks into the environment of training subprocesses."""
    import torch
    import torch.distributed as dist

    from tests.conftest import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def matmul_precision():
    """Set torch's float32 matmul precision for one test ('high': TF32 on GPUs), restored after."""
    import torch

    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)
