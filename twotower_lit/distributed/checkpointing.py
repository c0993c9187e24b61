"""Checkpoints of a sharded model: every rank writes and reads its own shards with
``torch.distributed.checkpoint`` (DCP), which also reshards on load (saved by 2 ranks, loaded by 1,
or with another plan). The trainer state goes to one small file from rank 0, and a checksum manifest
of every file is written last (`twotower_lit.distributed.checkpoint` has the file format)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from twotower_lit import patches
from twotower_lit.distributed.checkpoint import (MANIFEST_FILE, TRAINER_STATE_FILE, AllowListFileSystemReader,
                                                 CheckpointError, WeightsOnlyLoadPlanner, checkpoint_entries,
                                                 encode_trainer_state, hash_files, is_checkpoint_dir,
                                                 read_checkpoint, read_trainer_state, write_manifest)
from twotower_lit.sharded import require_shardable

REPLICATED_TABLES_KEY = "torchrec_data_parallel_tables"


def replicated_tables_of(checkpoint_path) -> Optional[List[str]]:
    """The data_parallel tables a checkpoint directory was trained with (None if it is no
    checkpoint directory: loading it then explains). Raises `CheckpointError` if its trainer state
    does not verify or read safely."""
    path = Path(checkpoint_path)
    if not is_checkpoint_dir(path):
        return None
    return list(read_trainer_state(path).get(REPLICATED_TABLES_KEY, []))


def module_state_dict(strategy) -> Dict[str, Any]:
    """The LightningModule's state, the sharded model's under ``<module_attr>.``.

    Not ``LightningModule.state_dict()``: that hands DMP the prefix, and
    ``DistributedModelParallel.state_dict(prefix=...)`` (TorchRec 1.6-1.9) adds it a second time when
    it holds no DDP wrapper. The keys are therefore the same whatever the process count and gradient
    sync, so checkpoints move between them."""
    lm, dmp = strategy.lightning_module, strategy.sharded_model
    state = patches.own_state_dict(lm)
    for name, child in lm.named_children():
        if child is dmp:
            state.update({f"{name}.{k}": v for k, v in dmp.state_dict().items()})
        else:
            child.state_dict(destination=state, prefix=f"{name}.")
    return state


def save(strategy, checkpoint: Dict[str, Any], filepath) -> None:
    """DCP shards from every rank, the trainer state from rank 0, then the checksum manifest: a
    directory without one was not completely written (collective)."""
    path = Path(strategy.broadcast(str(filepath)))
    if strategy.is_global_zero:
        if path.is_file():
            path.unlink()
        elif path.is_dir():  # an earlier, maybe partial, checkpoint of this name: none of its files stays
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    strategy.barrier("torchrec_checkpoint_mkdir")
    sharded = {"state_dict": checkpoint.pop("state_dict")}
    for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
        sharded[f"optimizer_{i}"] = state
    dcp.save(sharded, checkpoint_id=str(path))  # collective: each rank writes its own shards
    if strategy.is_global_zero:
        checkpoint[REPLICATED_TABLES_KEY] = strategy.replicated_tables
        (path / TRAINER_STATE_FILE).write_bytes(encode_trainer_state(checkpoint))
    strategy.barrier("torchrec_checkpoint_saved")
    _write_manifest(strategy, path)
    strategy.barrier("torchrec_checkpoint_sealed")


def _write_manifest(strategy, path: Path) -> None:
    """Hash the checkpoint's files and write the manifest from rank 0 (collective). Each node's
    ranks share out the files that node sees, so the manifest covers every rank's shards both on a
    shared file system and where each node has its own directory (synced to one place later, as
    SageMaker does with checkpoints)."""
    visible = checkpoint_entries(path)
    digests = hash_files(path, visible[strategy.local_rank::max(1, strategy.num_processes)])
    if strategy.world_size > 1:
        gathered: List[Optional[Dict[str, Any]]] = [None] * strategy.world_size
        dist.all_gather_object(gathered, digests)
        digests = {name: entry for part in gathered for name, entry in (part or {}).items()}
    if strategy.is_global_zero:
        write_manifest(path, digests)


def _read_verified(strategy, path: Path) -> Dict[str, Any]:
    """`read_checkpoint` on every rank (each verifies the files it sees), and the same error on
    every rank if any rank refuses the checkpoint, so that none goes on into DCP's collectives."""
    checkpoint, error = None, None
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as e:
        error = str(e)
    if strategy.world_size > 1:
        errors: List[Optional[str]] = [None] * strategy.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise CheckpointError(error)
    assert checkpoint is not None
    return checkpoint


def load(strategy, checkpoint_path) -> Dict[str, Any]:
    """Verify a checkpoint, refuse one of another model or table placement, then load its shards
    into the sharded model and its optimizers (collective). Returns the trainer state."""
    return _load(strategy, checkpoint_path, with_optimizers=True)


def load_weights(strategy, checkpoint_path) -> Dict[str, Any]:
    """Verify a checkpoint, refuse one of another model, then load only its model weights into
    the sharded model (collective; the optimizers keep their state): the best epoch of a finished
    fit, before it is tested and exported. Returns the trainer state."""
    return _load(strategy, checkpoint_path, with_optimizers=False)


def _load(strategy, checkpoint_path, with_optimizers: bool) -> Dict[str, Any]:
    path = Path(strategy.broadcast(str(checkpoint_path)))
    if not is_checkpoint_dir(path):
        raise FileNotFoundError(f"{path} is not a checkpoint written by TorchRecStrategy (it has neither "
                                f"{MANIFEST_FILE} nor {TRAINER_STATE_FILE}); pass a directory under the "
                                f"checkpoint dir")
    checkpoint = _read_verified(strategy, path)  # verified, and read without running code from it
    lm = strategy.lightning_module
    if lm is not None:
        require_shardable(lm).check_resumable(checkpoint, str(path))
    saved = checkpoint.pop(REPLICATED_TABLES_KEY, [])
    if with_optimizers and saved != strategy.replicated_tables:
        # their embedding optimizer state is kept by a plain optimizer, not by the fused kernels
        raise ValueError(f"{path} was trained with data_parallel tables {saved or 'none'}, this run has "
                         f"{strategy.replicated_tables or 'none'}: resume it with the same data_parallel tables "
                         f"(--sharding / --table-sharding), the other tables may use any sharding")
    target: Dict[str, Any] = {"state_dict": module_state_dict(strategy)}
    optimizers = [patches.unwrapped_optimizer(o) for o in strategy.optimizers] if with_optimizers else []
    for i, opt in enumerate(optimizers):
        if hasattr(opt, "init_state"):
            # optimizer state is created lazily; without it the load target has no slots and DCP
            # silently skips the saved Adam moments (the resumed run would diverge)
            opt.init_state()
        target[f"optimizer_{i}"] = opt.state_dict()
    dcp.load(target, checkpoint_id=str(path), storage_reader=AllowListFileSystemReader(str(path)),
             planner=WeightsOnlyLoadPlanner())
    # LightningModule.load_state_dict would bypass DMP's key rewriting: give the DMP its sub-dict
    prefix = strategy.module_attr + "."
    state = target["state_dict"]
    strategy.sharded_model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if rest:
        lm.load_state_dict(rest, strict=False)
    for i, opt in enumerate(optimizers):
        opt.load_state_dict(target[f"optimizer_{i}"])
    checkpoint["state_dict"] = {}
    return checkpoint


def remove(strategy, filepath) -> None:
    if strategy.is_global_zero and os.path.isdir(filepath):
        shutil.rmtree(filepath)


def full_state_dict(strategy) -> Optional[Dict[str, torch.Tensor]]:
    """The unsharded state dict of the inner model on rank 0 (None on other ranks; collective).
    Sharded tables are gathered with `ShardedTensor.gather` (DTensors with `full_tensor`)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    full: Dict[str, torch.Tensor] = {}
    for key, value in strategy.sharded_model.state_dict().items():
        if isinstance(value, ShardedTensor):
            # (from the metadata: the tensor's own `.size()` and `.dtype` go through ShardedTensor's
            # deprecated dispatch)
            meta = value.metadata()
            out = torch.empty(meta.size, dtype=meta.tensor_properties.dtype, device=strategy.root_device) \
                if strategy.is_global_zero else None
            value.gather(dst=0, out=out)
            if out is not None:
                full[key] = out.cpu()
        elif isinstance(value, DTensor):
            full[key] = value.full_tensor().cpu()
        else:
            full[key] = value.detach().cpu()
    return full if strategy.is_global_zero else None
