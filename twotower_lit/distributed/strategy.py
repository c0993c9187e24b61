"""A Lightning strategy that shards a LightningModule's ``model`` with TorchRec's DistributedModelParallel.

Each hook is a few lines over the parts of this package: `planning` (which table goes where),
`sharding` (DMP, the module's parts, and the averaging of what it does not shard), `checkpointing` (DCP on every rank).
The module never learns how it is distributed: it gets its parameters by kind through
`twotower_lit.sharded.ShardedParts`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torchrec.distributed.model_parallel import DistributedModelParallel

from twotower_lit import patches
from twotower_lit.distributed import checkpointing
from twotower_lit.distributed.planning import REPLICATED
from twotower_lit.distributed.sharding import check_gradient_sync, shard_module
from twotower_lit.sharded import require_shardable


class TorchRecStrategy(DDPStrategy):
    """DDPStrategy whose `setup` applies TorchRec DistributedModelParallel to `lightning_module.model`.

    `table_kinds`: the sharding kind of every table by feature (`planning.table_kinds`; a feature
    left out: the planner's choice). `gradient_sync` / `allreduce_precision`: how the unsharded
    parameters' gradients are averaged (`sharding.DataParallelAcrossRanks`). `for_capture`: the
    model is built for training steps captured as CUDA graphs (`sharding.shard_model`)."""

    strategy_name = "torchrec"

    def __init__(self, table_kinds: Optional[Mapping[str, str]] = None, gradient_sync: str = "allreduce",
                 allreduce_precision: str = "fp32", for_capture: bool = False,
                 sigterm_check_every_n_steps: int = 50, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table_kinds = dict(table_kinds or {})
        self.gradient_sync = check_gradient_sync(gradient_sync)  # before any process starts
        self.allreduce_precision = allreduce_precision
        self.for_capture = for_capture
        self.sigterm_check_every_n_steps = sigterm_check_every_n_steps
        self.module_attr = "model"
        self.plan_description: Dict[str, Dict[str, Any]] = {}

    def setup_distributed(self) -> None:
        if self._process_group_backend is None:
            self._process_group_backend = "nccl" if self.root_device.type == "cuda" else "gloo"
        super().setup_distributed()

    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        patches.throttle_sigterm_broadcast(trainer.fit_loop.epoch_loop, self.sigterm_check_every_n_steps)
        lm = require_shardable(self.lightning_module)
        if not isinstance(lm.model, DistributedModelParallel):
            self.plan_description = shard_module(lm, dist.GroupMember.WORLD, self.root_device, self.table_kinds,
                                                 gradient_sync=self.gradient_sync,
                                                 allreduce_precision=self.allreduce_precision,
                                                 for_capture=self.for_capture, local_world_size=self.num_processes)
            if self.is_global_zero:
                for table, d in self.plan_description.items():
                    print(f"sharding plan: {table}: {d['sharding_type']} ({d['compute_kernel']}) on ranks {d['ranks']}",
                          flush=True)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)  # after the wrap: optimizers must see the sharded parameters
        self.setup_precision_plugin()

    def model_to_device(self) -> None:
        lm = self.lightning_module
        if any(p.is_meta for p in lm.parameters()):
            return  # not wrapped yet; DMP places every parameter itself
        lm.to(self.root_device)

    def teardown(self) -> None:
        lm = self.lightning_module
        if lm is None or not any(p.is_meta for p in lm.parameters()):
            super().teardown()
            return
        # a setup that stopped before sharding leaves the tables on meta, which Lightning's
        # teardown cannot move to the CPU: its error would replace the one that stopped the run
        self._lightning_module = None
        try:
            super().teardown()
        finally:
            self._lightning_module = lm

    def configure_ddp(self) -> None:
        """DMP already averages the dense part's gradients; an outer DDP would do it twice."""

    @property
    def replicated_tables(self) -> List[str]:
        """Tables of the plan sharded data_parallel (every rank holds them whole)."""
        return sorted(t for t, d in self.plan_description.items() if d["sharding_type"] == REPLICATED)

    @property
    def sharded_model(self) -> DistributedModelParallel:
        return self.lightning_module.model

    # checkpoints: DCP on every rank
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the shards must exist before a checkpoint can be loaded into them

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores the optimizer state with DCP

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        return checkpointing.module_state_dict(self)

    def optimizer_state(self, optimizer) -> Dict[str, Any]:
        return patches.unwrapped_optimizer(optimizer).state_dict()

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        checkpointing.save(self, checkpoint, filepath)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        return checkpointing.load(self, checkpoint_path)

    def load_model_weights(self, checkpoint_path) -> Dict[str, Any]:
        """Only the model weights of a checkpoint (collective; the best epoch after a fit)."""
        return checkpointing.load_weights(self, checkpoint_path)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Done in `load_checkpoint`."""

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Done in `load_checkpoint`."""

    def remove_checkpoint(self, filepath) -> None:
        checkpointing.remove(self, filepath)

    def full_model_state_dict(self):
        """The unsharded model's state on rank 0, None elsewhere (collective: the export's input)."""
        return checkpointing.full_state_dict(self)
