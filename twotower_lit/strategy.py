"""A Lightning strategy that shards a LightningModule's ``model`` with TorchRec's DistributedModelParallel.

All TorchRec distribution knowledge lives here; the LightningModule only builds its model (with the
embedding tables on the ``meta`` device) and never learns whether it is sharded.

What the hooks do (Lightning 2.6 + TorchRec 1.6-1.9):
* ``setup``: plan the sharding with TorchRec's planner, wrap ``lightning_module.model`` in DMP
  (which allocates only the local shards; the gradients of the dense towers and of replicated
  tables are averaged across processes by one all-reduce per step, or by DDP:
  ``DataParallelAcrossRanks``), then build the optimizers, which must see the wrapped parameters.
  ``shard_model`` also keeps TorchRec's input distribution from syncing with the GPU on every
  step (``cache_input_dist_permutations``).
* ``setup`` replicates small tables (data_parallel) when there is more than one GPU, and keeps
  a resumed checkpoint's replicated tables (``table_kinds``).
* ``setup`` also makes Lightning's per-step SIGTERM broadcast (a host sync) every N steps.
* ``configure_ddp``: no outer DDP; ``model_to_device``: never ``.to()`` meta parameters.
* ``pipelined_training_step``: optional TorchRec ``TrainPipelineSparseDist`` training (a module
  with manual optimisation hands it Lightning's batch iterator; see ``PipelinedTwoTowerModule``).
* checkpoints: every rank holds different shards, so every rank writes with
  ``torch.distributed.checkpoint`` (DCP). DCP also reshards on load (saved by 2 ranks, loaded
  by 1, or with another plan). Non-tensor trainer state goes to one small file from rank 0, and a
  checksum manifest of every file is written last (`twotower_lit.checkpoint`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_lit.checkpoint import (MANIFEST_FILE, TRAINER_STATE_FILE, AllowListFileSystemReader, CheckpointError,
                                     WeightsOnlyLoadPlanner, checkpoint_entries, encode_trainer_state, hash_files,
                                     is_checkpoint_dir, read_checkpoint, read_trainer_state, write_manifest)
from twotower_lit.config import ALLREDUCE_PRECISIONS, GRADIENT_SYNCS
from twotower_lit.graphs import on_capture_stream, plan_refusal

log = logging.getLogger(__name__)

REPLICATED_TABLES_KEY = "torchrec_data_parallel_tables"

SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "table_row_wise": ShardingType.TABLE_ROW_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}


class EmbeddingBagCollectionShardingOffer(EmbeddingBagCollectionSharder):
    """The stock sharder offers row-wise sharding only on CUDA; its CPU kernel handles it too.
    (`build_sharding_plan` keeps data_parallel out of the planner's own choice: it is used only
    when asked for.)"""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def parse_table_sharding(spec: Optional[str]) -> Dict[str, str]:
    """'user:row_wise,item:table_wise' -> {'user': 'row_wise', 'item': 'table_wise'}."""
    out: Dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, kind = part.partition(":")
        if kind.strip() not in SHARDING_TYPES:
            raise ValueError(f"--table-sharding: {part!r} must be FEATURE:KIND with KIND one of "
                             f"{', '.join(SHARDING_TYPES)}")
        out[name.strip()] = kind.strip()
    return out


def build_sharding_plan(module: torch.nn.Module, pg: dist.ProcessGroup, device_type: str, sharding: str,
                        table_sharding: Optional[Mapping[str, str]] = None,
                        local_world_size: Optional[int] = None) -> ShardingPlan:
    """TorchRec planner's plan for `module` (every rank must call this: it is collective).

    `sharding` is 'auto' (the planner picks per table) or one kind for every table;
    `table_sharding` maps feature names (tables are ``t_<feature>``) to a kind for that table.
    Sharded tables use the fused kernel, so the embedding optimizer runs inside the backward pass.
    data_parallel tables are replicated: the dense kernel, gradients averaged across ranks, and the
    embedding optimizer as a plain optimizer (`TwoTowerModule.configure_optimizers`). They need no
    all-to-all, which pays off for tables small enough to copy to every GPU; a table that is
    replicated must fit one device, and every step all-reduces its whole gradient.
    """
    if sharding != "auto" and sharding not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding {sharding!r}; choose auto or one of {', '.join(SHARDING_TYPES)}")
    sharder = EmbeddingBagCollectionShardingOffer()
    tables = [cfg.name for cfg in _ebc(module).embedding_bag_configs()]
    overrides = {f"t_{k}": v for k, v in (table_sharding or {}).items()}
    unknown = sorted(set(overrides) - set(tables))
    if unknown:
        raise ValueError(f"--table-sharding names unknown feature(s) {unknown}; tables: {tables}")
    offered = sharder.sharding_types(device_type)
    constraints = {}
    for table in tables:
        kind = overrides.get(table, sharding)
        if kind == "auto":  # the planner's own choice, data_parallel left out
            types = [t for t in offered if t != ShardingType.DATA_PARALLEL.value]
        else:
            types = [SHARDING_TYPES[kind]]
        kernel = EmbeddingComputeKernel.DENSE if kind == "data_parallel" else EmbeddingComputeKernel.FUSED
        constraints[table] = ParameterConstraints(sharding_types=types, compute_kernels=[kernel.value])
    world = pg.size()
    topology = Topology(world_size=world, local_world_size=local_world_size or world, compute_device=device_type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(module, [sharder], pg)


def check_gradient_sync(name: str) -> str:
    if name not in GRADIENT_SYNCS:
        raise ValueError(f"--gradient-sync {name!r}: choose one of {', '.join(GRADIENT_SYNCS)}")
    return name


class GradientAverager:
    """Averages the gradients of replicated parameters over a process group after each backward
    pass: one all-reduce of one flat buffer (per device and dtype), plus one in place for each
    parameter of at least `IN_PLACE_NUMEL` elements; nothing in the forward pass.

    What DDP does for these parameters, without its per-step host work. A host-bound GPU step pays
    for DDP's forward wrapper (it walks the inputs and outputs), its per-parameter autograd hooks
    into the C++ reducer and its bucket bookkeeping: ~1.3 ms of a ~4.8 ms step on one H200, and 5-6%
    of the end-to-end rate on two (`benchmarks/GPU_RESULTS.md`). Here a hook on each parameter only
    queues one callback per backward pass, which runs when the pass has finished: it concatenates
    the gradients (one kernel), all-reduces them (one collective; NCCL averages in it, gloo sums and
    a division follows) and sets each ``.grad`` to its slice of the result. A large gradient (the
    fused weight of the replicated tables: 74 MB for ML-32M's) is all-reduced where it is instead:
    copying it into the buffer and out cost 0.04 ms of a 2.0 ms step replayed on each of two H200s.
    `comm_dtype` (``--allreduce-precision bf16``): the gradients travel as bfloat16 and are summed
    in it, as DDP's bf16 compression hook and TorchRec's ``allreduce_comm_precision`` do: half the
    bytes. Nothing overlaps the backward pass as DDP's buckets do: the largest gradient, the
    replicated tables', is the backward pass's last (their lookup is the forward pass's first op),
    and the towers' are small. A parameter that got no gradient on a rank counts as zeros there, as
    with DDP's ``find_unused_parameters``. Like DDP, the constructor copies rank 0's values to every
    rank, so replicas start equal whatever each rank's initialisation."""

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
        self._queued_in: Optional[int] = None  # the backward pass (graph task) whose callback is queued
        with torch.no_grad():
            for group in self.groups:
                flat = torch.cat([p.detach().reshape(-1) for p in group])
                dist.broadcast(flat, src=dist.get_global_rank(pg, 0), group=pg)
                for p, value in zip(group, self._split(flat, group)):
                    p.copy_(value.view_as(p))
        # through a weak reference: the garbage collector does not free a cycle that runs through a
        # tensor's hooks (parameter -> hook -> averager -> parameter; torch 2.13), which would keep
        # the parameters, this averager and its process group alive after the model, and the
        # group's threads into the interpreter's exit (`twotower_lit.training.close_process_group`)
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
        task = torch._C._current_graph_task_id()
        if task != self._queued_in:
            self._queued_in = task
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

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
    the tables sharded data_parallel (replicated), whose lookup TorchRec's sharded collection wraps
    in a DDP of its own.

    ``allreduce`` (the default): one `GradientAverager` over the towers and the replicated
    tables' weights; the towers are left unwrapped and each replicated lookup is taken out of its
    DDP (`unwrap_replicated_lookups`). ``ddp``: TorchRec's wrappers, DDP around the module and
    around each replicated lookup, which overlap the gradients' all-reduce with the backward pass:
    worth it for dense towers large enough that the all-reduce, not the host, bounds a step. A
    one-process job has nothing to average and gets neither. `allreduce_precision`: fp32, or bf16
    (gradients sent as bfloat16: the averager's, or with ``ddp`` TorchRec's compression hook on the
    DDP around the module; the replicated lookups' own DDPs stay fp32)."""

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
        module = dmp._dmp_wrapped_module.to(device)  # as TorchRec's wrapper does: the towers start on the host
        sharded = set(DistributedModelParallel._sharded_parameter_names(module))
        replicated = [p for name, p in module.named_parameters() if name not in sharded and p.requires_grad]
        replicated += [p for lookup in unwrap_replicated_lookups(module) for p in lookup.parameters()
                       if p.requires_grad]
        if replicated:
            dmp.gradient_averager = GradientAverager(replicated, env.process_group, self.comm_dtype)


def unwrap_replicated_lookups(module: torch.nn.Module) -> List[torch.nn.Module]:
    """Take the lookups of data_parallel tables out of the DDP that TorchRec's sharded collection
    puts around each (TorchRec 1.6-1.9, ``ShardedEmbeddingBagCollection.__init__``), and return them.

    Why: that DDP (``broadcast_buffers=True``) broadcasts the lookup's constant buffers (table
    offsets) in every forward pass and runs its reducer's hooks and bucket copies in the backward
    pass: host work on every step of a host-bound GPU step. Its constructor has already copied rank
    0's weights to every rank, which is all that is kept of it; the caller averages the lookups'
    gradients instead (`GradientAverager`). TorchRec unwraps these DDPs wherever it reads the
    lookups after construction (``while isinstance(lookup, DistributedDataParallel)``), so a bare
    lookup serves it the same. The reducer's autograd hooks are removed, so nothing else averages."""
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    lookups = []
    for sub in module.modules():
        if not isinstance(sub, ShardedEmbeddingBagCollection):
            continue
        for i, lookup in enumerate(sub._lookups):
            if isinstance(lookup, torch.nn.parallel.DistributedDataParallel):
                lookup._remove_autograd_hooks()
                sub._lookups[i] = lookup = lookup.module
                lookups.append(lookup)
    return lookups


def cache_input_dist_permutations() -> None:
    """Make TorchRec's KJT all-to-all reuse its feature permutation instead of rebuilding it per step.

    `KJTAllToAllTensorsAwaitable` (TorchRec 1.6-1.9) calls `dist_data._get_recat` on every step,
    even in a one-process job that never uses the result, and that function copies a Python list
    to the GPU with `torch.tensor(..., device=...)`: a blocking copy from pageable memory, so a
    host-device synchronisation per step, which keeps a host-bound step from queueing ahead of the
    GPU. The permutation depends only on the arguments (feature split, world size, stagger, batch
    size per rank), and TorchRec only reads it, so one tensor per argument set is kept and reused.
    (`benchmarks/train_throughput.py --profile-steps` counts the syncs per step.) Idempotent; not
    applied while torch.compile traces."""
    from torchrec.distributed import dist_data

    original = dist_data._get_recat
    if getattr(original, "cached", False):
        return
    cache: Dict[Tuple, Optional[torch.Tensor]] = {}

    @functools.wraps(original)
    def get_recat(local_split: int, num_splits: int, stagger: int = 1, device: Optional[torch.device] = None,
                  batch_size_per_rank: Optional[List[int]] = None) -> Optional[torch.Tensor]:
        if torch.compiler.is_compiling():
            return original(local_split, num_splits, stagger, device, batch_size_per_rank)
        key = (local_split, num_splits, stagger, None if device is None else torch.device(device),
               None if batch_size_per_rank is None else tuple(batch_size_per_rank))
        if key not in cache:
            if len(cache) >= 1024:  # variable batch sizes: a bound, not expected to be reached
                cache.clear()
            cache[key] = original(local_split, num_splits, stagger, device, batch_size_per_rank)
        return cache[key]

    get_recat.cached = True  # type: ignore[attr-defined]
    dist_data._get_recat = get_recat


def shard_model(module: torch.nn.Module, plan: ShardingPlan, pg: dist.ProcessGroup,
                device: torch.device, gradient_sync: str = "allreduce",
                for_capture: bool = False, allreduce_precision: str = "fp32") -> DistributedModelParallel:
    """`module` under DMP with `plan` (collective: every rank calls it); `gradient_sync` and
    `allreduce_precision` as `DataParallelAcrossRanks`'. `for_capture`: built on the stream its
    training steps will be captured on as CUDA graphs (`twotower_lit.graphs.on_capture_stream`
    says why)."""
    cache_input_dist_permutations()
    # On CPU, the backward pass through the replicated (data_parallel) tables' dense fbgemm lookup
    # warns that the op has no autograd kernel and "may lead to silently incorrect behavior". Its
    # gradients are those of a sum-pooled nn.EmbeddingBag (checked by tests/training/
    # test_optimizers.py), so the warning is only noise in every CPU run with replicated tables.
    warnings.filterwarnings("ignore", category=UserWarning, message="fbgemm::dense_embedding_codegen_lookup_function: "
                            "an autograd kernel was not registered")
    with on_capture_stream(device) if for_capture else contextlib.nullcontext():
        wrapper = DataParallelAcrossRanks(gradient_sync, allreduce_precision)
        return DistributedModelParallel(module=module, device=device, plan=plan,
                                        sharders=[EmbeddingBagCollectionShardingOffer()],
                                        env=ShardingEnv.from_process_group(pg), data_parallel_wrapper=wrapper)


def describe_plan(plan: ShardingPlan) -> Dict[str, Dict[str, Any]]:
    """{table: {sharding_type, compute_kernel, ranks}} of a plan (printed and logged to MLflow)."""
    out = {}
    for _, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            out[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                          "ranks": list(ps.ranks or [])}
    return out


def replicated_tables_of(checkpoint_path) -> Optional[List[str]]:
    """The data_parallel tables a `TorchRecStrategy` checkpoint directory was trained with (None
    if it is no checkpoint directory: `load_checkpoint` then explains). Raises `CheckpointError`
    if its trainer state does not verify or read safely."""
    path = Path(checkpoint_path)
    if not is_checkpoint_dir(path):
        return None
    return list(read_trainer_state(path).get(REPLICATED_TABLES_KEY, []))


def _ebc(module: torch.nn.Module):
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    for sub in module.modules():
        if isinstance(sub, EmbeddingBagCollection):
            return sub
    raise ValueError("the model has no EmbeddingBagCollection to shard")


class _FeaturesThenRest:
    """Feeds a TorchRec train pipeline the features of each batch and keeps the rest of the batch.

    The pipeline copies, distributes and traces one ``KeyedJaggedTensor`` per batch (what the
    sharded model takes); the labels wait here in fetch order, which is the order in which the
    pipeline runs its forwards (it runs each fetched batch exactly once).
    """

    def __init__(self, batches: Iterator) -> None:
        self.batches = batches
        self.waiting: Deque = deque()

    def __iter__(self) -> "_FeaturesThenRest":
        return self

    def __next__(self) -> KeyedJaggedTensor:
        item = next(self.batches)
        batch = item[0] if isinstance(item, tuple) else item  # Lightning yields (batch, index, loader index)
        self.waiting.append(batch)
        return batch.features


def throttle_sigterm_broadcast(epoch_loop: Any, every_n_steps: int) -> None:
    """Check for SIGTERM every `every_n_steps` training steps instead of before every step.

    Lightning 2.6 broadcasts rank 0's SIGTERM flag before each step of a multi-process run and
    reads it with ``.item()``: a host-device sync per step that keeps the host from queueing the
    next step while the GPUs work (Lightning-AI/pytorch-lightning#21487; a Trainer option for it,
    #21640, is not released). It broadcasts before the first step and before the first step
    after each multiple of `every_n_steps` batches trained (a call of several steps may jump over
    the multiple itself). Every rank counts the same batches, so all ranks still broadcast
    together; a SIGTERM is noticed at most ``every_n_steps - 1`` steps (or one call) later.
    """
    original = getattr(epoch_loop, "_broadcast_sigterm_tensor", None)
    if original is None or every_n_steps <= 1 or getattr(original, "throttled", False):
        return
    last: Optional[int] = None  # batches trained at the previous step's start

    def throttled() -> None:
        nonlocal last
        done = epoch_loop.total_batch_idx + 1
        if last is None or done // every_n_steps != last // every_n_steps:
            original()
        last = done

    throttled.throttled = True  # type: ignore[attr-defined]
    epoch_loop._broadcast_sigterm_tensor = throttled


class TorchRecStrategy(DDPStrategy):
    """DDPStrategy whose `setup` applies TorchRec DistributedModelParallel to `lightning_module.model`."""

    strategy_name = "torchrec"

    def __init__(self, sharding: str = "table_wise", table_sharding: Optional[Mapping[str, str]] = None,
                 module_attr: str = "model", sigterm_check_every_n_steps: int = 50,
                 data_parallel_below_mb: float = 0.0, resumed_data_parallel_tables: Optional[List[str]] = None,
                 gradient_sync: str = "allreduce", cuda_graphs: bool = False, allreduce_precision: str = "fp32",
                 **kwargs: Any) -> None:
        """`sharding`/`table_sharding` as `build_sharding_plan`'s. With more than one GPU, tables of
        at most `data_parallel_below_mb` MB that `table_sharding` does not name are replicated
        (data_parallel); 0 turns that off. `resumed_data_parallel_tables`: the data_parallel tables
        of the checkpoint the run resumes (`replicated_tables_of`), which then stay replicated
        instead, and no other table is replicated by size. `gradient_sync`: how the unsharded
        parameters' gradients are averaged across ranks, and `allreduce_precision` what they are sent
        as (`DataParallelAcrossRanks`). `cuda_graphs`: the model is built for steps captured as CUDA
        graphs where the plan allows it (`shard_model`'s ``for_capture``)."""
        super().__init__(**kwargs)
        self.cuda_graphs = cuda_graphs
        self.allreduce_precision = allreduce_precision
        self.gradient_sync = check_gradient_sync(gradient_sync)  # before any process starts
        self.sigterm_check_every_n_steps = sigterm_check_every_n_steps
        self.sharding = sharding
        self.table_sharding = dict(table_sharding or {})
        self.data_parallel_below_mb = data_parallel_below_mb
        self.resumed_data_parallel_tables = resumed_data_parallel_tables
        self.module_attr = module_attr
        self.plan_description: Dict[str, Dict[str, Any]] = {}
        self._pipeline: Optional[TrainPipelineSparseDist] = None
        self._pipeline_input: Optional[_FeaturesThenRest] = None
        self._pipeline_loss: Optional[Callable] = None

    # ------------------------------------------------------------------ setup
    def setup_distributed(self) -> None:
        if self._process_group_backend is None:
            self._process_group_backend = "nccl" if self.root_device.type == "cuda" else "gloo"
        super().setup_distributed()

    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        throttle_sigterm_broadcast(trainer.fit_loop.epoch_loop, self.sigterm_check_every_n_steps)
        lm = self.lightning_module
        inner = getattr(lm, self.module_attr)
        if not isinstance(inner, DistributedModelParallel):
            pg = dist.GroupMember.WORLD
            device_type = self.root_device.type
            # replicated by size only on GPUs, where it was measured (see DistributedConfig.data_parallel_below_mb)
            kinds = self.table_kinds(inner, replicate_small=pg.size() > 1 and device_type == "cuda")
            plan = build_sharding_plan(inner, pg, device_type, self.sharding, kinds,
                                       local_world_size=self.num_processes)
            self.plan_description = describe_plan(plan)
            if self.is_global_zero:
                for table, d in self.plan_description.items():
                    print(f"sharding plan: {table}: {d['sharding_type']} ({d['compute_kernel']}) on ranks {d['ranks']}",
                          flush=True)
            # built for capture only where this plan can be captured (`plan_refusal`)
            capture = self.cuda_graphs and plan_refusal(pg.size(), self.plan_description) is None
            setattr(lm, self.module_attr, shard_model(inner, plan, pg, self.root_device, self.gradient_sync,
                                                          for_capture=capture,
                                                          allreduce_precision=self.allreduce_precision))
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)  # after the wrap: optimizers must see the sharded parameters
        self.setup_precision_plugin()

    def table_kinds(self, module: torch.nn.Module, replicate_small: bool) -> Dict[str, str]:
        """Per-feature sharding overrides of this run: `table_sharding`, plus data_parallel for the
        tables it replicates: those of the resumed checkpoint (their embedding optimizer state
        has another form than a sharded table's, so resuming keeps the placement), or else, if
        `replicate_small`, every unnamed table of at most `data_parallel_below_mb` MB of float32
        weights. A replicated table needs no all-to-all; each step all-reduces its whole gradient."""
        kinds = dict(self.table_sharding)
        for cfg in _ebc(module).embedding_bag_configs():
            feature = cfg.feature_names[0]  # one feature per table (`TwoTower`)
            if feature in kinds:
                continue
            if self.resumed_data_parallel_tables is not None:
                if cfg.name in self.resumed_data_parallel_tables:
                    kinds[feature] = "data_parallel"
            elif replicate_small and cfg.num_embeddings * cfg.embedding_dim * 4 <= self.data_parallel_below_mb * 2**20:
                kinds[feature] = "data_parallel"
        return kinds

    def model_to_device(self) -> None:
        lm = self.lightning_module
        if any(p.is_meta for p in lm.parameters()):
            return  # not wrapped yet; DMP places every parameter itself
        lm.to(self.root_device)

    def configure_ddp(self) -> None:
        """DMP already averages the dense part's gradients; an outer DDP would do it twice."""

    @property
    def replicated_tables(self) -> List[str]:
        """Tables of the plan sharded data_parallel (every rank holds them whole)."""
        return sorted(t for t, d in self.plan_description.items()
                      if d["sharding_type"] == ShardingType.DATA_PARALLEL.value)

    @property
    def sharded_model(self) -> DistributedModelParallel:
        return getattr(self.lightning_module, self.module_attr)

    # ------------------------------------------------------------------ pipelined training
    def pipelined_training_step(self, dataloader_iter: Iterator,
                                loss_fn: Callable[[Any], Tuple[torch.Tensor, Any]]) -> List[Any]:
        """One training step through TorchRec's `TrainPipelineSparseDist`, which copies batch i+2 to
        the device and starts the embedding input distribution (the all-to-all) of batch i+1 while
        batch i runs forward, backward and the optimizer step.

        Called from ``training_step(dataloader_iter)`` of a module with manual optimisation, so that
        the pipeline drives the optimizer. `loss_fn(batch)` gets a device batch (features already
        distributed) and returns ``(loss, output)``. Returns the outputs of the optimizer steps
        done: one, except at the end of an epoch, when the batches still in flight are finished in
        the same call (Lightning's fetcher reports the epoch done as soon as the last batch was
        fetched, which the pipeline does two steps ahead).
        """
        if self._pipeline is None:
            self._pipeline_input = _FeaturesThenRest(dataloader_iter)
            self._pipeline = TrainPipelineSparseDist(self.sharded_model, self.lightning_module.optimizers(),
                                                     self.root_device, execute_all_batches=True,
                                                     custom_model_fwd=self._pipeline_forward)
        self._pipeline_loss = loss_fn
        outputs: List[Any] = []
        try:
            outputs.append(self._pipeline.progress(self._pipeline_input))
            while getattr(dataloader_iter, "done", False):  # every batch fetched: finish those in flight
                outputs.append(self._pipeline.progress(self._pipeline_input))
        except StopIteration:  # the pipeline is empty: the epoch's batches are all trained
            self.end_pipeline()
            if not outputs:
                raise
        return outputs

    def _pipeline_forward(self, features: KeyedJaggedTensor) -> Tuple[torch.Tensor, Any]:
        """The batch (a dataclass with a ``features`` field) with the pipeline's distributed
        features and its other tensors moved to the device, through the module's loss."""
        assert self._pipeline_input is not None and self._pipeline_loss is not None
        rest = self._pipeline_input.waiting.popleft()
        moved = {f.name: getattr(rest, f.name).to(self.root_device, non_blocking=True)
                 for f in dataclasses.fields(rest)
                 if f.name != "features" and isinstance(getattr(rest, f.name), torch.Tensor)}
        return self._pipeline_loss(dataclasses.replace(rest, features=features, **moved))

    def pause_pipeline(self) -> None:
        """Give the sharded modules their own forward back (evaluation mid-epoch); the batches in
        flight stay queued and the next training step re-attaches the pipeline."""
        if self._pipeline is not None:
            self._pipeline.detach()

    def end_pipeline(self) -> None:
        """Detach and drop the pipeline (the next epoch starts a new one on its own iterator)."""
        self.pause_pipeline()
        self._pipeline = self._pipeline_input = self._pipeline_loss = None

    def on_validation_start(self) -> None:
        self.pause_pipeline()
        super().on_validation_start()

    def on_test_start(self) -> None:
        self.pause_pipeline()
        super().on_test_start()

    def on_predict_start(self) -> None:
        self.pause_pipeline()
        super().on_predict_start()

    def on_train_end(self) -> None:
        self.end_pipeline()  # stopped by max_steps: batches fetched ahead are not trained, as without a pipeline
        super().on_train_end()

    # ------------------------------------------------------------------ checkpoints (DCP on every rank)
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the shards must exist before a checkpoint can be loaded into them

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores the optimizer state with DCP

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        """The LightningModule's state, the sharded model's under ``<module_attr>.``.

        Built here rather than by ``LightningModule.state_dict()``: that hands DMP the prefix, and
        `DistributedModelParallel.state_dict(prefix=...)` (TorchRec 1.6-1.9) adds it a second time
        (``model.model.ebc...``) when it holds no DDP wrapper (`DataParallelAcrossRanks` adds
        none by default), and would re-prefix entries its parent wrote before it. The keys are
        therefore the same whatever the process count and gradient sync, so checkpoints move
        between them."""
        lm, dmp = self.lightning_module, self.sharded_model
        state: Dict[str, Any] = {}
        lm._save_to_state_dict(state, "", keep_vars=False)  # the LightningModule's own tensors, if any
        for name, child in lm.named_children():
            if child is dmp:
                state.update({f"{name}.{k}": v for k, v in dmp.state_dict().items()})
            else:
                child.state_dict(destination=state, prefix=f"{name}.")
        return state

    def optimizer_state(self, optimizer) -> Dict[str, Any]:
        return getattr(optimizer, "_optimizer", optimizer).state_dict()

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """DCP shards from every rank, the trainer state from rank 0, then the checksum manifest
        (`twotower_lit.checkpoint`): a directory without one was not completely written."""
        path = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            if path.is_file():
                path.unlink()
            elif path.is_dir():  # an earlier, maybe partial, checkpoint of this name: none of its files stays
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
        self.barrier("torchrec_checkpoint_mkdir")
        sharded = {"state_dict": checkpoint.pop("state_dict")}
        for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
            sharded[f"optimizer_{i}"] = state
        dcp.save(sharded, checkpoint_id=str(path))  # collective: each rank writes its own shards
        if self.is_global_zero:
            checkpoint[REPLICATED_TABLES_KEY] = self.replicated_tables
            (path / TRAINER_STATE_FILE).write_bytes(encode_trainer_state(checkpoint))
        self.barrier("torchrec_checkpoint_saved")
        self._write_manifest(path)
        self.barrier("torchrec_checkpoint_sealed")

    def _write_manifest(self, path: Path) -> None:
        """Hash the checkpoint's files and write the manifest from rank 0 (collective). Each node's
        ranks share out the files that node sees, so the manifest covers every rank's shards both
        on a shared file system and where each node has its own directory (synced to one place
        later, as SageMaker does with checkpoints)."""
        visible = checkpoint_entries(path)
        digests = hash_files(path, visible[self.local_rank::max(1, self.num_processes)])
        if self.world_size > 1:
            gathered: List[Optional[Dict[str, Any]]] = [None] * self.world_size
            dist.all_gather_object(gathered, digests)
            digests = {name: entry for part in gathered for name, entry in (part or {}).items()}
        if self.is_global_zero:
            write_manifest(path, digests)

    def _read_checkpoint(self, path: Path) -> Dict[str, Any]:
        """`read_checkpoint` on every rank (each verifies the files it sees), and the same error on
        every rank if any rank refuses the checkpoint, so that none goes on into DCP's collectives."""
        checkpoint, error = None, None
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as e:
            error = str(e)
        if self.world_size > 1:
            errors: List[Optional[str]] = [None] * self.world_size
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise CheckpointError(error)
        assert checkpoint is not None
        return checkpoint

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_checkpoint_dir(path):
            raise FileNotFoundError(f"{path} is not a checkpoint written by TorchRecStrategy (it has neither "
                                    f"{MANIFEST_FILE} nor {TRAINER_STATE_FILE}); pass a directory under the "
                                    f"checkpoint dir")
        checkpoint = self._read_checkpoint(path)  # verified, and read without running code from it
        check = getattr(self.lightning_module, "check_resumable", None)
        if check is not None:
            check(checkpoint, str(path))
        saved = checkpoint.pop(REPLICATED_TABLES_KEY, [])
        if saved != self.replicated_tables:
            # their embedding optimizer state is kept by a plain optimizer, not by the fused kernels
            raise ValueError(f"{path} was trained with data_parallel tables {saved or 'none'}, this run has "
                             f"{self.replicated_tables or 'none'}: resume it with the same data_parallel tables "
                             f"(--sharding / --table-sharding), the other tables may use any sharding")
        lm = self.lightning_module
        target: Dict[str, Any] = {"state_dict": self.lightning_module_state_dict()}
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        for i, opt in enumerate(optimizers):
            if hasattr(opt, "init_state"):
                # optimizer state is created lazily; without it the load target has no slots and DCP
                # silently skips the saved Adam moments (the resumed run would diverge)
                opt.init_state()
            target[f"optimizer_{i}"] = opt.state_dict()
        dcp.load(target, checkpoint_id=str(path), storage_reader=AllowListFileSystemReader(str(path)),
                 planner=WeightsOnlyLoadPlanner())
        # LightningModule.load_state_dict would bypass DMP's key rewriting: give the DMP its sub-dict
        prefix = self.module_attr + "."
        state = target["state_dict"]
        self.sharded_model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
        if rest:
            lm.load_state_dict(rest, strict=False)
        for i, opt in enumerate(optimizers):
            opt.load_state_dict(target[f"optimizer_{i}"])
        checkpoint["state_dict"] = {}
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Done in `load_checkpoint`."""

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Done in `load_checkpoint`."""

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero and os.path.isdir(filepath):
            shutil.rmtree(filepath)

    # ------------------------------------------------------------------ export
    def full_model_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The unsharded state dict of the inner model on rank 0 (None on other ranks).

        Collective: every rank must call it. Sharded tables are gathered with
        `ShardedTensor.gather` (DTensors with `full_tensor`); dense tensors are replicated already.
        """
        from torch.distributed._shard.sharded_tensor import ShardedTensor
        from torch.distributed.tensor import DTensor

        full: Dict[str, torch.Tensor] = {}
        for key, value in self.sharded_model.state_dict().items():
            if isinstance(value, ShardedTensor):
                # (from the metadata: the tensor's own `.size()` and `.dtype` go through ShardedTensor's
                # deprecated dispatch)
                meta = value.metadata()
                out = torch.empty(meta.size, dtype=meta.tensor_properties.dtype, device=self.root_device) \
                    if self.is_global_zero else None
                value.gather(dst=0, out=out)
                if out is not None:
                    full[key] = out.cpu()
            elif isinstance(value, DTensor):
                full[key] = value.full_tensor().cpu()
            else:
                full[key] = value.detach().cpu()
        return full if self.is_global_zero else None
