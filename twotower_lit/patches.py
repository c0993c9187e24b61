"""Every monkeypatch and private-API use of Lightning, TorchRec and torch, in one place.

Each function names the upstream internals it relies on and the releases it was written against
(`TARGETS`); `check_upstream()` says what is missing, and the training job calls it before it
builds anything, so an upgrade that moves one of them fails at once with the name of what moved
(tests/training/test_patches.py runs the same check). The rest of the project calls these
functions rather than the private names.

Targets: Lightning 2.6, TorchRec 1.6-1.9, torch 2.11-2.13.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# (module, attribute path) of each private name used below, and what uses it
TARGETS: Tuple[Tuple[str, str, str], ...] = (
    ("torchrec.distributed.dist_data", "_get_recat", "cache_input_dist_permutations"),
    ("torchrec.distributed.embeddingbag", "ShardedEmbeddingBagCollection", "unwrap_replicated_lookups"),
    ("torchrec.distributed.model_parallel", "DistributedModelParallel._sharded_parameter_names",
     "sharded_parameter_names"),
    ("torch.nn.parallel", "DistributedDataParallel._remove_autograd_hooks", "unwrap_replicated_lookups"),
    ("torch._C", "_current_graph_task_id", "current_backward_pass"),
    ("torch.autograd.variable", "Variable._execution_engine", "after_backward_pass"),
    ("torch.nn", "Module._save_to_state_dict", "own_state_dict"),
    ("lightning.pytorch.loops.training_epoch_loop", "_TrainingEpochLoop._broadcast_sigterm_tensor",
     "throttle_sigterm_broadcast"),
    ("lightning.pytorch.loops.progress", "_BatchProgress.increment_by", "count_extra_batches"),
    ("lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
     "_LoggerConnector.should_update_logs", "should_update_logs"),
)


def check_upstream() -> List[str]:
    """What of `TARGETS` the installed packages lack ('' list: all there)."""
    missing = []
    for module, path, user in TARGETS:
        try:
            obj: Any = importlib.import_module(module)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{path} (used by twotower_lit.patches.{user})")
    # instance attributes: set by LightningOptimizer's constructor
    from lightning.pytorch.core.optimizer import LightningOptimizer

    wrapped = LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    for name in ("_on_before_step", "_on_after_step", "_optimizer"):
        if not hasattr(wrapped, name):
            missing.append(f"LightningOptimizer().{name} (used by twotower_lit.patches.lean_optimizer_step)")
    return missing


def require_upstream() -> None:
    """Fail, naming what moved, when an installed release lacks an internal used here."""
    missing = check_upstream()
    if missing:
        import lightning
        import torchrec

        raise RuntimeError(f"internals this project relies on are missing from the installed releases "
                           f"(torch {torch.__version__}, torchrec {torchrec.__version__}, lightning "
                           f"{lightning.__version__}; written for Lightning 2.6, TorchRec 1.6-1.9, torch 2.11-2.13): "
                           f"{'; '.join(missing)}. Install the versions of requirements/, or adapt "
                           f"twotower_lit/patches.py")


# ---------------------------------------------------------------------------------------------- TorchRec


def cache_input_dist_permutations() -> None:
    """Make TorchRec's KJT all-to-all reuse its feature permutation instead of rebuilding it per step.

    `KJTAllToAllTensorsAwaitable` calls `dist_data._get_recat` on every step, even in a one-process
    job that never uses the result, and it copies a Python list to the GPU with a blocking copy from
    pageable memory: a host-device synchronisation per step. The permutation depends only on the
    arguments and TorchRec only reads it, so one tensor per argument set is kept. Idempotent; not
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


def unwrap_replicated_lookups(module: torch.nn.Module) -> List[torch.nn.Module]:
    """Take the lookups of data_parallel tables out of the DDP that TorchRec's sharded collection
    puts around each (``ShardedEmbeddingBagCollection._lookups``), and return them.

    That DDP broadcasts the lookup's constant buffers in every forward pass and runs its reducer's
    hooks in the backward pass: host work on every step of a host-bound GPU step. Its constructor
    has already copied rank 0's weights to every rank, which is all that is kept of it; the caller
    averages the gradients instead. TorchRec unwraps these DDPs wherever it reads the lookups, so a
    bare lookup serves it the same. The reducer's hooks are removed, so nothing else averages."""
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


def sharded_parameter_names(module: torch.nn.Module) -> Iterable[str]:
    """Names of the parameters TorchRec shards in `module` (DMP's own helper)."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    return DistributedModelParallel._sharded_parameter_names(module)


def fused_weight_slice(params: Sequence[torch.Tensor]) -> Optional[Tuple[torch.Tensor, int, int]]:
    """(fused weight, start, end) when `params`, in order, are TorchRec ``TableBatchedEmbeddingSlice``
    views (``_original_tensor``, ``_start_offset``, ``_end_offset``) of adjacent ranges of one
    fused weight, as the tables of a data_parallel lookup are; None otherwise."""
    base = getattr(params[0], "_original_tensor", None)
    if base is None:
        return None
    start = end = getattr(params[0], "_start_offset", None)
    for p in params:
        if getattr(p, "_original_tensor", None) is not base or getattr(p, "_start_offset", None) != end:
            return None
        end = p._end_offset
    return base, start, end


def quiet_replicated_lookup_warning() -> None:
    """On CPU, the backward pass through the replicated tables' dense fbgemm lookup warns that the op
    has no autograd kernel. Its gradients are those of a sum-pooled nn.EmbeddingBag (checked by
    tests/training/test_optimizers.py), so the warning is only noise."""
    warnings.filterwarnings("ignore", category=UserWarning, message="fbgemm::dense_embedding_codegen_lookup_function: "
                            "an autograd kernel was not registered")


# ---------------------------------------------------------------------------------------------- torch


def current_backward_pass() -> int:
    """An id of the backward pass (autograd graph task) now running."""
    return torch._C._current_graph_task_id()


def after_backward_pass(callback: Callable[[], None]) -> None:
    """Run `callback` when the running backward pass has finished (autograd's engine queue)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def own_state_dict(module: torch.nn.Module) -> Dict[str, Any]:
    """`module`'s own parameters and buffers, without its children's."""
    state: Dict[str, Any] = {}
    module._save_to_state_dict(state, "", keep_vars=False)
    return state


# ---------------------------------------------------------------------------------------------- Lightning


def lean_optimizer_step(optimizer: Any, step: Optional[Callable[[], Any]] = None) -> Any:
    """Step a `LightningOptimizer`'s optimizer as its ``step`` does, without the strategy and
    precision plugin (``_on_before_step`` / ``_on_after_step`` count the step for ``global_step``);
    `step` replaces the optimizer's own step (a replayed graph that contains it). Returns its result."""
    optimizer._on_before_step()
    out = (step or optimizer.optimizer.step)()
    optimizer._on_after_step()
    return out


def count_extra_batches(trainer: Any, extra: int, is_last_batch: bool) -> None:
    """Count `extra` more training batches in Lightning's epoch loop than the one call it counted
    (a training_step that trained several): the checkpointed position in the epoch and the logging
    step then mean what they mean with one batch per call."""
    loop = trainer.fit_loop.epoch_loop
    loop.batch_progress.increment_by(extra, is_last_batch=is_last_batch)
    loop._batches_that_stepped += extra


def should_update_logs(trainer: Any) -> bool:
    """Whether Lightning writes logs at this step (every ``log_every_n_steps``)."""
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or connector.should_update_logs


def throttle_sigterm_broadcast(epoch_loop: Any, every_n_steps: int) -> None:
    """Check for SIGTERM every `every_n_steps` training steps instead of before every step.

    Lightning 2.6 broadcasts rank 0's SIGTERM flag before each step of a multi-process run and
    reads it with ``.item()``: a host-device sync per step (Lightning-AI/pytorch-lightning#21487).
    It broadcasts before the first step and before the first step after each multiple of
    `every_n_steps` batches trained. Every rank counts the same batches, so all ranks still
    broadcast together; a SIGTERM is noticed at most ``every_n_steps - 1`` steps (or one call) later."""
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


def lean_steps_allowed(trainer: Any, module: Any) -> bool:
    """Whether a step that calls backward and the optimizer directly (`lean_optimizer_step`) does
    exactly what Lightning's ``manual_backward`` and ``LightningOptimizer.step`` do in this run:
    plain 32-bit precision, the strategy's step hooks Lightning's own no-ops (the module is not
    wrapped in DDP; no model averaging), no profiler, and no callback or module override of the
    hooks Lightning calls around each backward pass and optimizer step."""
    import lightning as L
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.profilers import PassThroughProfiler
    from lightning.pytorch.strategies import DDPStrategy, Strategy

    strategy = trainer.strategy
    if type(trainer.precision_plugin) is not Precision or not isinstance(trainer.profiler, PassThroughProfiler):
        return False
    if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel) \
            or getattr(strategy, "_model_averager", None) is not None:
        return False
    if any(getattr(type(strategy), hook) not in (getattr(Strategy, hook), getattr(DDPStrategy, hook))
           for hook in ("pre_backward", "backward", "post_backward", "optimizer_step")):
        return False
    if any(getattr(type(module), hook) is not getattr(L.LightningModule, hook)
           for hook in ("on_before_backward", "backward", "on_after_backward", "on_before_optimizer_step")):
        return False
    return not any(getattr(type(cb), hook) is not getattr(L.Callback, hook) for cb in trainer.callbacks
                   for hook in ("on_before_backward", "on_after_backward", "on_before_optimizer_step"))


def finish_epoch_of_epoch_end_checkpoint(checkpoint: Dict[str, Any]) -> None:
    """Mark the epoch of a checkpoint written at the end of its training epoch as finished
    (Lightning's fit-loop state layout: ``loops.fit_loop.epoch_progress`` etc.).

    The end-of-epoch checkpoint is written in ``on_train_epoch_end``, before Lightning counts the
    epoch as completed: "epoch N started, every batch done". Resumed as it is, Lightning 2.6 ends
    epoch N without a step and, still restarting, finds epoch N+1's batch count reached too, so the
    run stops without training any remaining epoch. The state is rewritten to the one the next epoch
    starts from. So is that of a step checkpoint written after the epoch's last batch (before
    Lightning counts that batch complete). A mid-epoch checkpoint is left as it is."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or not batches.get("is_last_batch"):
        return
    current = batches["current"]
    if epochs["current"]["started"] <= epochs["current"]["completed"] or current["completed"] < current["ready"] - 1:
        return
    if current["completed"] < current["ready"]:  # the step checkpoint of the last batch: count it complete
        batches["total"]["completed"] = batches["total"]["ready"]
        stepped = loop.get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in stepped:
            stepped["_batches_that_stepped"] += 1
    for progress in (epochs["total"], epochs["current"]):
        progress["processed"] = progress["completed"] = progress["started"]
    for key in current:
        current[key] = 0
    batches["is_last_batch"] = False
    checkpoint["epoch"] = epochs["current"]["completed"]


def carry_optimizer_steps(checkpoint: Dict[str, Any], automatic_optimization: bool) -> None:
    """Carry the optimizer-step count across optimisation modes: Lightning counts steps in a
    different loop state for automatic and manual optimisation, so a checkpoint written with one
    resumed with the other would restart ``global_step``."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    auto_key = "epoch_loop.automatic_optimization.optim_progress"
    manual_key = "epoch_loop.manual_optimization.optim_step_progress"
    if auto_key not in loop or manual_key not in loop:
        return
    steps = loop[auto_key]["optimizer"]["step"]
    if automatic_optimization and loop[manual_key]["total"]["completed"] > steps["total"]["completed"]:
        loop[auto_key]["optimizer"]["step"] = loop[manual_key]
    elif not automatic_optimization and steps["total"]["completed"] > loop[manual_key]["total"]["completed"]:
        loop[manual_key] = steps


def unwrapped_optimizer(optimizer: Any) -> Any:
    """The optimizer inside a `LightningOptimizer` (``_optimizer``), or `optimizer` itself."""
    return getattr(optimizer, "_optimizer", optimizer)
