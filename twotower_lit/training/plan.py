"""The run plan: every decision the configuration leaves to the job ('auto' and its consequences),
made once before anything is built, printed, logged, and followed by everything downstream."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from twotower_lit.config import TrainConfig
from twotower_lit.options import parse_bool
from twotower_lit.distributed.planning import graph_refusal, parse_table_sharding, table_kinds
from twotower_lit.optim import check_embedding_optimizer

GPU_STEPS_PER_EXECUTION = 16  # --steps-per-execution 0 on GPUs (see PerformanceConfig.steps_per_execution)
GRAPHED_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "sgd")  # FBGEMM's fused ones that keep no host step count
# GPU memory per training row that --data-on-device takes, with margin: the resident split (user and
# item ids as int64, the label as float32: 20 bytes) plus an epoch's order and its gathers
DEVICE_BYTES_PER_ROW = 64


@dataclass(frozen=True)
class RunPlan:
    """What this run does, resolved from the configuration, the data and the machine."""

    run_name: str
    output_dir: str
    checkpoint_dir: str
    resume_from: Optional[str]  # the checkpoint this run resumes, if any
    device_type: str  # "cuda" or "cpu"
    world_size: int
    data_on_device: bool  # training batches built on the device from a resident copy of the split
    steps_per_execution: int  # optimizer steps per Lightning training_step call
    cuda_graphs: bool  # training steps captured once and replayed as CUDA graphs
    graphs_required: bool  # --cuda-graphs on: a batch shape the graph cannot take is an error, not a fallback
    table_kinds: Dict[str, str] = field(default_factory=dict)  # feature -> sharding kind ('auto': the planner's)
    exposure_dims: int = 0  # the model's retrieval-only output dimensions (0 unless --loss both)
    global_candidates: bool = False  # the softmax's candidates are every rank's (several processes)
    why: Dict[str, str] = field(default_factory=dict)  # why an 'auto' went the way it did, where it is not obvious

    def describe(self) -> Dict[str, Any]:
        """The plan as flat, loggable values."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("table_kinds", "why")}
        out["table_kinds"] = ",".join(f"{f}:{k}" for f, k in self.table_kinds.items())
        return out

    def lines(self) -> List[str]:
        """What the job prints before it starts."""
        kinds = ", ".join(f"{f} {k}" for f, k in self.table_kinds.items())
        lines = [f"run plan: {self.world_size} process(es) on {self.device_type}; "
                 f"{self.steps_per_execution} step(s) per call; CUDA graphs {'on' if self.cuda_graphs else 'off'}; "
                 f"batches built {'on the device' if self.data_on_device else 'by the loader'}",
                 f"run plan: tables {kinds}"]
        if self.resume_from:
            lines.append(f"run plan: resuming {self.resume_from}")
        lines += [f"run plan: {what}: {reason}" for what, reason in self.why.items()]
        return lines


def device_type_of(cfg: TrainConfig) -> str:
    accelerator = cfg.distributed.accelerator
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def resolve_plan(cfg: TrainConfig, run_name: str, output_dir: str, checkpoint_dir: str, tables: Mapping[str, int],
                 train_rows: int, genre_ids_from_one: bool, resume_from: Optional[str],
                 resumed_replicated: Optional[List[str]], device_memory: Optional[int] = None) -> RunPlan:
    """The plan for `cfg` on this machine, writing to `output_dir` and `checkpoint_dir`: `tables`
    are the embedding tables' rows by feature,
    `train_rows` the training split's rows, `genre_ids_from_one` whether the multi-valued feature
    leaves row 0 free (a graph pads with it), `resume_from` the checkpoint to resume and
    `resumed_replicated` its data_parallel tables."""
    device_type = device_type_of(cfg)
    check_embedding_optimizer(cfg.optim.embedding_optimizer, device_type)
    world = cfg.distributed.devices * cfg.distributed.num_nodes
    why: Dict[str, str] = {}
    # tables are replicated by size only across several GPUs, where it pays (no all-to-all)
    replicate_mb = cfg.distributed.data_parallel_below_mb if world > 1 and device_type == "cuda" else 0.0
    kinds = table_kinds(tables, cfg.model.embedding_dim, cfg.distributed.sharding,
                        parse_table_sharding(cfg.distributed.table_sharding), replicate_mb, resumed_replicated)
    graphs, graphs_why = resolve_cuda_graphs(cfg, device_type, world, kinds, genre_ids_from_one)
    if graphs_why:
        why["CUDA graphs"] = graphs_why
    on_device = resolve_data_on_device(cfg, device_type, train_rows, device_memory)
    return RunPlan(
        run_name=run_name, output_dir=output_dir, checkpoint_dir=checkpoint_dir, resume_from=resume_from,
        device_type=device_type, world_size=world, data_on_device=on_device,
        steps_per_execution=resolve_steps_per_execution(cfg, device_type), cuda_graphs=graphs,
        graphs_required=cfg.performance.cuda_graphs == "on", table_kinds=kinds,
        # one objective, one score: the exposure dimensions would only be shrunk by the vector L2
        exposure_dims=cfg.model.exposure_dims if cfg.loss.kind == "both" else 0,
        global_candidates=world > 1 and cfg.loss.kind != "bce" and cfg.loss.softmax_candidates != "local", why=why)


def resolve_steps_per_execution(cfg: TrainConfig, device_type: str) -> int:
    """Optimizer steps per Lightning training_step call (``0``: by device)."""
    k = cfg.performance.steps_per_execution
    if k < 0:
        raise ValueError(f"--steps-per-execution must be at least 1 (or 0: by device), got {k}")
    return k or (GPU_STEPS_PER_EXECUTION if device_type == "cuda" else 1)


def resolve_cuda_graphs(cfg: TrainConfig, device_type: str, world: int, kinds: Mapping[str, str],
                        genre_ids_from_one: bool = True) -> "tuple[bool, Optional[str]]":
    """(whether the training steps are captured and replayed as CUDA graphs, why not where 'auto'
    would have expected them). ``on`` refuses a run that cannot, naming what to change; ``auto``
    takes them wherever they can run."""
    if cfg.performance.cuda_graphs == "off":
        return False, None
    needs = []
    if device_type != "cuda":
        needs.append("a GPU (--accelerator gpu)")
    if world > 1 and cfg.distributed.gradient_sync != "allreduce":
        needs.append("--gradient-sync allreduce with several processes (DDP's reducer works on the host in "
                     "every backward pass)")
    if cfg.optim.embedding_optimizer not in GRAPHED_EMBEDDING_OPTIMIZERS:
        needs.append(f"--embedding-optimizer {' or '.join(GRAPHED_EMBEDDING_OPTIMIZERS)} (FBGEMM's fused "
                     f"{cfg.optim.embedding_optimizer} passes its step count from the host at every launch)")
    if cfg.optim.lr_schedule != "constant" or cfg.optim.warmup_steps:
        needs.append("a constant learning rate (--lr-schedule constant --warmup-steps 0): TorchRec's fused "
                     "embedding optimizers read the rate when their kernel is launched, so a graph keeps its "
                     "capture's")
    if not genre_ids_from_one:
        needs.append("genre indices from 1 (this data uses index 0, the row that pads genres in a graph)")
    refusal = graph_refusal(world, kinds)
    if refusal:
        needs.append(refusal)
    if cfg.performance.cuda_graphs == "on" and needs:
        raise ValueError(f"--cuda-graphs on needs {'; '.join(needs)}. Change that, or pass --cuda-graphs off")
    # on a CPU 'auto' is simply off: only a GPU run is told why it steps eagerly
    return not needs, ("; ".join(needs) if needs and device_type == "cuda" else None)


def resolve_data_on_device(cfg: TrainConfig, device_type: str, train_rows: int,
                           device_memory: Optional[int] = None) -> bool:
    """Whether the training batches are built on the device from a copy of the split kept there.
    ``auto``: on GPUs when the run samples no negatives (that reader builds rated rows only) and
    the split takes at most a quarter of the GPU's total memory (`device_memory`, bytes; read from
    this process's GPU when not given; total, not free, so that every rank decides alike)."""
    choice = str(cfg.performance.data_on_device).strip().lower()
    if choice != "auto":
        try:  # (leniently: the option may come from a SageMaker hyperparameter)
            return parse_bool(choice)
        except argparse.ArgumentTypeError:
            raise ValueError(f"--data-on-device {cfg.performance.data_on_device!r}: choose auto, true or "
                             f"false") from None
    if device_type != "cuda" or cfg.data.negatives:
        return False
    if device_memory is None:  # (a launcher may show each process one GPU: then it is device 0)
        index = min(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count() - 1)
        device_memory = torch.cuda.get_device_properties(index).total_memory
    return train_rows * DEVICE_BYTES_PER_ROW <= device_memory // 4
