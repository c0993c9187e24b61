"""Sharding the model with TorchRec's DMP, handing the module its parts, and keeping the unsharded
parameters equal on every rank."""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.optimizers import in_backward_optimizer_filter

from twotower_lit import patches
from twotower_lit.config import ALLREDUCE_PRECISIONS, GRADIENT_SYNCS
from twotower_lit.distributed.planning import (REPLICATED, EmbeddingBagCollectionShardingOffer, build_sharding_plan,
                                               describe_plan)
from twotower_lit.graphs import on_capture_stream
from twotower_lit.sharded import ShardableModule, ShardedParts


def check_gradient_sync(name: str) -> str:
    if name not in GRADIENT_SYNCS:
        raise ValueError(f"--gradient-sync {name!r}: choose one of {', '.join(GRADIENT_SYNCS)}")
    return name


class GradientAverager:
    """Averages the gradients of replicated parameters over a process group after each backward
    pass: one all-reduce of one flat buffer (per device and dtype), plus one in place for each
    parameter of at least `IN_PLACE_NUMEL` elements; nothing in the forward pass.

    What DDP does for these parameters, without its per-step host work (its forward wrapper, its
    per-parameter hooks into the C++ reducer, its buckets), which a host-bound GPU step pays for.
    A hook on each parameter only queues one callback per backward pass, which runs when the pass
    has finished: it concatenates the gradients, all-reduces them (NCCL averages in the collective,
    gloo sums and a division follows) and sets each ``.grad`` to its slice. A large gradient (the
    fused weight of the replicated tables) is all-reduced where it is, saving two copies.
    `comm_dtype` (``--allreduce-precision bf16``): sent and summed as bfloat16, as DDP's bf16
    compression hook does. A parameter that got no gradient on a rank counts as zeros there (DDP's
    ``find_unused_parameters``). Like DDP, the constructor copies rank 0's values to every rank."""

    IN_PLACE_NUMEL = 1 << 20

    def __init__(self, params: Sequence[torch.nn.Parameter], pg: dist.ProcessGroup,
                 comm_dtype: Optional[torch.dtype] = None) -> None:
        self.pg = pg
        self.world = pg.size()
        self.comm_dtype = comm_dtype
        self.average_in_collective = dist.get_backend(pg) == dist.Backend.NCCL
        groups: Dict[Tuple[torch.device, torch.dtype], List[torch.nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.groups = list(groups.values())  # (broadcast flat at construction)
        self.large = [p for p in params if p.numel() >= self.IN_PLACE_NUMEL]  # all-reduced in place
        self.flat_groups = [small for small in ([p for p in group if p.numel() < self.IN_PLACE_NUMEL]
                                                for group in self.groups) if small]
        self._queued_in: Optional[int] = None  # the backward pass whose callback is queued
        with torch.no_grad():
            for group in self.groups:
                flat = torch.cat([p.detach().reshape(-1) for p in group])
                dist.broadcast(flat, src=dist.get_global_rank(pg, 0), group=pg)
                for p, value in zip(group, self._split(flat, group)):
                    p.copy_(value.view_as(p))
        # through a weak reference: the garbage collector does not free a cycle that runs through a
        # tensor's hooks (parameter -> hook -> averager -> parameter), which would keep the process
        # group's threads alive into the interpreter's exit (`twotower_lit.training.job.close_process_group`)
        weak = weakref.WeakMethod(self._on_gradient)

        def on_gradient(param: torch.Tensor) -> None:
            method = weak()
            if method is not None:
                method(param)

        self._hooks = [p.register_post_accumulate_grad_hook(on_gradient) for group in self.groups for p in group]

    @staticmethod
    def _split(flat: torch.Tensor, group: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        return flat.split([p.numel() for p in group])

    def _on_gradient(self, _param: torch.Tensor) -> None:
        # once per backward pass; keyed by the pass rather than a flag that the callback resets, so
        # that a pass that failed before its callback ran does not keep the next one from averaging
        task = patches.current_backward_pass()
        if task != self._queued_in:
            self._queued_in = task
            patches.after_backward_pass(self._average)

    def _average(self) -> None:
        for p in self.large:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._all_reduce(p.grad)
        for group in self.flat_groups:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            self._all_reduce(flat)
            for p, g in zip(group, self._split(flat, group)):
                p.grad = g.view_as(p)

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        """Average `tensor` over the group, in place (sent as `comm_dtype` when one is set)."""
        sent = tensor if self.comm_dtype in (None, tensor.dtype) else tensor.to(self.comm_dtype)
        if self.average_in_collective:
            dist.all_reduce(sent, op=dist.ReduceOp.AVG, group=self.pg)
        else:
            dist.all_reduce(sent, group=self.pg)
            sent.div_(self.world)
        if sent is not tensor:
            tensor.copy_(sent)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class DataParallelAcrossRanks(DefaultDataParallelWrapper):
    """How DMP keeps the parameters it does not shard equal on every rank: the dense towers, and
    the tables sharded data_parallel (replicated), whose lookup TorchRec wraps in a DDP of its own.

    ``allreduce`` (the default): one `GradientAverager` over the towers and the replicated tables'
    weights; the towers are left unwrapped and each replicated lookup is taken out of its DDP.
    ``ddp``: TorchRec's wrappers, which overlap the all-reduce with the backward pass: worth it for
    dense towers large enough that the all-reduce, not the host, bounds a step. A one-process job has
    nothing to average. `allreduce_precision`: fp32, or bf16 (the averager's, or with ``ddp``
    TorchRec's compression hook on the DDP around the module)."""

    def __init__(self, gradient_sync: str = "allreduce", allreduce_precision: str = "fp32") -> None:
        if allreduce_precision not in ALLREDUCE_PRECISIONS:
            raise ValueError(f"--allreduce-precision {allreduce_precision!r}: choose one of "
                             f"{', '.join(ALLREDUCE_PRECISIONS)}")
        super().__init__(allreduce_comm_precision=None if allreduce_precision == "fp32" else allreduce_precision)
        self.gradient_sync = check_gradient_sync(gradient_sync)
        self.comm_dtype = None if allreduce_precision == "fp32" else torch.bfloat16

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        if env.world_size == 1:
            return
        if self.gradient_sync == "ddp":
            super().wrap(dmp, env, device)
            return
        if getattr(dmp, "gradient_averager", None) is not None:
            return
        module = dmp.module.to(device)  # as TorchRec's wrapper does: the towers start on the host
        sharded = set(patches.sharded_parameter_names(module))
        replicated = [p for name, p in module.named_parameters() if name not in sharded and p.requires_grad]
        replicated += [p for lookup in patches.unwrap_replicated_lookups(module) for p in lookup.parameters()
                       if p.requires_grad]
        if replicated:
            dmp.gradient_averager = GradientAverager(replicated, env.process_group, self.comm_dtype)


def shard_model(module: torch.nn.Module, plan: ShardingPlan, pg: dist.ProcessGroup,
                device: torch.device, gradient_sync: str = "allreduce",
                for_capture: bool = False, allreduce_precision: str = "fp32") -> DistributedModelParallel:
    """`module` under DMP with `plan` (collective: every rank calls it); `gradient_sync` and
    `allreduce_precision` as `DataParallelAcrossRanks`'. `for_capture`: built on the stream its
    training steps will be captured on as CUDA graphs (`twotower_lit.graphs.on_capture_stream`)."""
    patches.cache_input_dist_permutations()
    patches.quiet_replicated_lookup_warning()
    with on_capture_stream(device) if for_capture else contextlib.nullcontext():
        wrapper = DataParallelAcrossRanks(gradient_sync, allreduce_precision)
        return DistributedModelParallel(module=module, device=device, plan=plan,
                                        sharders=[EmbeddingBagCollectionShardingOffer()],
                                        env=ShardingEnv.from_process_group(pg), data_parallel_wrapper=wrapper)


def shard_module(module: ShardableModule, pg: dist.ProcessGroup, device: torch.device,
                 kinds: Optional[Mapping[str, str]] = None, default: str = "auto", gradient_sync: str = "allreduce",
                 allreduce_precision: str = "fp32", for_capture: bool = False,
                 local_world_size: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """Plan `module.model`'s sharding (table kinds as `planning.build_sharding_plan`'s), put it under
    DMP (`shard_model`), and hand the module its parts (collective). Returns the plan's description."""
    plan = build_sharding_plan(module.model, pg, device.type, kinds or {}, default, local_world_size)
    description = describe_plan(plan)
    module.model = shard_model(module.model, plan, pg, device, gradient_sync, for_capture, allreduce_precision)
    module.on_sharded(sharded_parts(module.model, description))
    return description


def sharded_parts(dmp: DistributedModelParallel, plan: Dict[str, Dict]) -> ShardedParts:
    """The parameters of a sharded model by how they are trained (`twotower_lit.sharded`): the fused
    tables' in-backward optimizer, the replicated tables (named by `plan`, `describe_plan`'s form),
    and the rest (the towers)."""
    replicated_names = {t for t, d in plan.items() if d["sharding_type"] == REPLICATED}
    unfused = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    replicated = {k: p for k, p in unfused.items() if _table_of(k) in replicated_names}
    dense = {k: p for k, p in unfused.items() if k not in replicated}
    return ShardedParts(fused_optimizer=dmp.fused_optimizer, replicated_tables=replicated, dense=dense,
                        zero_rows=lambda tables: first_rows(dmp, tables))


def _table_of(name: str) -> Optional[str]:
    """The table of a parameter name of TorchRec's sharded collection (``...embedding_bags.<table>.weight``)."""
    parts = name.split(".")
    return parts[parts.index("embedding_bags") + 1] if "embedding_bags" in parts[:-1] else None


def first_rows(model: torch.nn.Module, tables: Sequence[str]) -> List[torch.Tensor]:
    """Views of row 0 of each of `tables` in this rank's part of the sharded embedding collection.
    A table sharded by rows has row 0 on one rank only; a replicated table on every rank."""
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    collections = [m for m in model.modules() if isinstance(m, ShardedEmbeddingBagCollection)]
    if len(collections) != 1:
        raise ValueError(f"expected one sharded embedding collection, found {len(collections)}")
    state = collections[0].state_dict()
    views = []
    for table in tables:
        weight = state.get(f"embedding_bags.{table}.weight")
        if weight is None:
            raise KeyError(f"no table {table!r} in the sharded collection (it has "
                           f"{sorted(k.split('.')[1] for k in state if k.endswith('.weight'))})")
        if hasattr(weight, "local_shards"):
            views += [s.tensor[0] for s in weight.local_shards() if s.metadata.shard_offsets[0] == 0]
        else:
            views.append(weight[0])
    return views
