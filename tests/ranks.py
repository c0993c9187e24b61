"""Tests that run a function on several gloo processes, each of which ends as the training job
ends: its collectives' state released before the interpreter exits."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def _rank_main(rank: int, body: Callable[..., None], store_file: str, world: int, args: tuple) -> None:
    import torch.distributed as dist

    from twotower_lit.training.job import close_process_group

    # a file store: no server thread in rank 0 that could still be serving another rank at exit
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world), rank=rank, world_size=world)
    try:
        # the body's locals (models holding the group, tensors the last collectives hold) are
        # garbage once it returns, so closing the group joins gloo's threads before Python
        # finalises: a thread left to free a collective's tensors during finalisation aborts
        body(rank, *args)
    finally:
        close_process_group()


def run_ranks(body: Callable[..., None], world: int, tmp_path: Path, *args: Any) -> None:
    """Run `body(rank, *args)` on `world` spawned processes joined by one gloo group; fails with
    the first process's error."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(body, str(tmp_path / "store"), world, args), nprocs=world, join=True)
