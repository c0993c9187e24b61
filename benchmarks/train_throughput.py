"""Training throughput of the TorchRec two-tower, next to a plain PyTorch two-tower of the same shape.

Run under torchrun (one process per GPU, or CPU processes with gloo):

    torchrun --standalone --nproc_per_node 1 -m benchmarks.train_throughput --shape ml-1m --batch 8192
    torchrun --standalone --nproc_per_node 2 -m benchmarks.train_throughput --shape ml-32m --batch 65536

Modes (all in one invocation, so their ratio holds on a noisy machine):
  lightning  the product's path: TwoTowerModule + TorchRecStrategy in a Lightning Trainer
  lightning_multistep  the same with --steps-per-execution K (EagerSteps(K): K steps per Lightning
             training_step call; K from this script's --steps-per-execution)
  eager      the same DMP model and optimizers in a hand-written loop (Lightning's overhead = the gap)
  compiled   eager with the DMP model under torch.compile, with TorchRec's PT2 settings (those of its
             TrainPipelinePT2: TorchRec's modules traced, the batch's jagged sizes as unbacked symbols)
  graphed    eager's step captured once as a CUDA graph and replayed (twotower_lit.graphs, the training
             job's --cuda-graphs): each step copies its batch into the graph's input tensors
  pipeline   TorchRec's TrainPipelineSparseDist (overlaps copy + input distribution with compute)
  plain      plain PyTorch: nn.EmbeddingBag tables + MLP towers + Adam, data parallel via DDP
Batches are built by the product's KJTBuilder from synthetic feature tables and kept in pinned
host memory; every step copies its batch to the device, as a data loader would. Samples/s are
totals over all ranks (per-rank batch = --batch).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from twotower_lit.config import ALLREDUCE_PRECISIONS, GRADIENT_SYNCS

SHAPES = {  # users, items as in the GroupLens sets
    "ml-1m": (6_040, 3_706),
    "ml-32m": (200_948, 87_585),
}
SIDE = {"gender": 3, "age": 8, "occupation": 22, "zip": 1000, "genres": 21, "year": 100}


def feature_tables(users: int, items: int, seed: int = 0):
    from twotower_lit.data.batches import FeatureTables

    rng = np.random.default_rng(seed)
    u = {"user": np.arange(users + 1)}
    for name in ("gender", "age", "occupation", "zip"):
        u[name] = rng.integers(1, SIDE[name], users + 1)
    lengths = rng.integers(1, 4, items + 1)
    lengths[0] = 0
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    genres = rng.integers(1, SIDE["genres"], int(indptr[-1]))
    it = {"item": np.arange(items + 1), "year": rng.integers(1, SIDE["year"], items + 1)}
    return FeatureTables(u, it, indptr, genres)


def feature_specs(users: int, items: int):
    from twotower_lit.model import FeatureSpec

    specs = [FeatureSpec("user", users + 1, "user")] + [FeatureSpec(n, SIDE[n], "user")
                                                        for n in ("gender", "age", "occupation", "zip")]
    return specs + [FeatureSpec("item", items + 1, "item"), FeatureSpec("genres", SIDE["genres"], "item"),
                    FeatureSpec("year", SIDE["year"], "item")]


def make_batches(builder, users: int, items: int, batch: int, count: int, seed: int, pin: bool) -> List:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        u = rng.integers(1, users + 1, batch)
        i = np.minimum((rng.random(batch) ** 3 * items).astype(np.int64) + 1, items)  # skewed popularity
        b = builder.batch(u, i, (rng.random(batch) < 0.57).astype(np.float32))
        out.append(b.pin_memory() if pin else b)
    return out


class PlainTwoTower(nn.Module):
    """The same towers on plain `nn.EmbeddingBag` tables (no TorchRec)."""

    def __init__(self, specs, dim: int, layers: List[int]) -> None:
        super().__init__()
        from twotower_lit.layers import mlp

        self.user_features = [s.name for s in specs if s.tower == "user"]
        self.item_features = [s.name for s in specs if s.tower == "item"]
        self.tables = nn.ModuleDict({s.name: nn.EmbeddingBag(s.num_embeddings, dim, mode=s.pooling)
                                     for s in specs})
        self.user_tower = mlp(dim * len(self.user_features), layers)
        self.item_tower = mlp(dim * len(self.item_features), layers)

    def forward(self, kjt):
        d = kjt.to_dict()
        pooled = {n: self.tables[n](d[n].values(), d[n].offsets()[:-1]) for n in d}
        u = self.user_tower(torch.cat([pooled[n] for n in self.user_features], 1))
        i = self.item_tower(torch.cat([pooled[n] for n in self.item_features], 1))
        return u, i


PROFILED: Dict[str, Dict] = {}  # mode -> GPU kernel time and kernel launches per step (--profile-steps)
TRACE_DIR: Optional[str] = None  # --trace: where the host + GPU traces of the profiled steps go


def timed(step, batches, steps: int, warmup: int, device, profile_steps: int = 0, mode: str = "") -> float:
    def run(n):
        for k in range(n):
            step(batches[k % len(batches)])
        sync(device)

    run(warmup)
    t0 = time.perf_counter()
    run(steps)
    seconds = time.perf_counter() - t0
    if profile_steps and (device.type == "cuda" or TRACE_DIR):
        PROFILED[mode] = profiled(run, profile_steps, device, mode)
    return seconds


def profiler(device):
    """torch.profiler over the GPU's kernels, and over host ops too with --trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else []
    return profile(activities=activities + ([ProfilerActivity.CPU] if TRACE_DIR else []))


def profiled(run, n: int, device, mode: str = "") -> Dict[str, float]:
    """`run(n)` (n steps) under the profiler; `profile_report` of it."""
    with profiler(device) as prof:
        run(n)
    report = profile_report(prof, n, device, mode)
    if device.type == "cuda":
        report["syncs_per_step"] = host_syncs(run, n)
    return report


def host_syncs(run, n: int) -> float:
    """Host-device synchronisations per step that go through PyTorch (`.item()`, `.tolist()`, a
    blocking copy from pageable host memory...), counted by its sync debug mode. Each one makes the
    host wait for every queued kernel before it can queue more, so a host-bound step cannot run
    ahead of the GPU. (`run` ends with one deliberate sync: counted alone with `run(0)` and removed.)"""
    def count(steps: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    return max(0, count(n) - count(0)) / n


def profile_report(prof, n: int, device, mode: str) -> Dict[str, float]:
    """GPU time (kernels, copies) and launches per step over `n` profiled steps: next to the
    wall-clock ms/step it tells a launch-bound step (GPU idle between kernels) from a GPU-bound
    one. With --trace, the ops with the most host time per step are printed and the Chrome trace
    is written to TRACE_DIR/<mode>-rank<r>.json."""
    averages = prof.key_averages()
    if TRACE_DIR:
        rank = dist.get_rank()
        os.makedirs(TRACE_DIR, exist_ok=True)
        prof.export_chrome_trace(os.path.join(TRACE_DIR, f"{mode}-rank{rank}.json"))
        if rank == 0:
            print(f"\n[{mode}] host time per step, top ops (ms): self / total, calls per step")
            for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:25]:
                print(f"  {e.self_cpu_time_total / n / 1e3:7.3f} {e.cpu_time_total / n / 1e3:7.3f} "
                      f"{e.count / n:6.1f}  {e.key[:90]}")
    if device.type != "cuda":
        return {}
    # the kernels and copies themselves: host ops also carry their kernels' time, and annotated
    # regions (record_function) show on the GPU timeline too; neither is summed a second time
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    if TRACE_DIR and dist.get_rank() == 0:
        print(f"[{mode}] GPU time per step, top kernels (ms), launches per step")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]:
            print(f"  {e.self_device_time_total / n / 1e3:7.3f} {e.count / n:6.1f}  {e.key[:90]}")
    return {"gpu_ms_per_step": sum(e.self_device_time_total for e in kernels) / n / 1e3,
            "launches_per_step": sum(e.count for e in kernels) / n}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def build_dmp(specs, args, device, for_capture: bool = False):
    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.distributed.sharding import shard_module
    from twotower_lit.training.module import TwoTowerModule

    lm = TwoTowerModule(specs, ModelConfig(embedding_dim=args.dim, user_layers=[128, 64], item_layers=[128, 64]),
                        OptimConfig())
    shard_module(lm, dist.group.WORLD, device, default=args.sharding, gradient_sync=args.gradient_sync,
                 allreduce_precision=args.allreduce_precision, for_capture=for_capture,
                 local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    lm.to(device)
    return lm, lm.configure_optimizers()["optimizer"]


def eager_step(lm, opt, b, device, model=None, prepare=lambda kjt: kjt) -> torch.Tensor:
    """One eager training step of `lm` (BCE, no L2) on batch `b`, through `model` (default
    ``lm.model``) with its features passed through `prepare`; returns the loss."""
    from twotower_lit.layers import logits

    b = b.to(device, non_blocking=True)
    # zero_grad before the forward pass: TorchRec's fused optimizers write the learning rate
    # into a tensor there, which a compiled forward pass saves for its backward pass
    opt.zero_grad()
    user, item = (lm.model if model is None else model)(prepare(b.features))
    loss = F.binary_cross_entropy_with_logits(logits(user, item, lm.model_cfg.exposure_dims), b.labels)
    loss.backward()
    opt.step()
    return loss


def run_eager(specs, batches, args, device, mode: str = "eager") -> float:
    lm, opt = build_dmp(specs, args, device)
    model, prepare = lm.model, (lambda kjt: kjt)
    if mode == "compiled":
        from torchrec.pt2.utils import kjt_for_pt2_tracing

        torch._dynamo.config.capture_scalar_outputs = True
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        torch._dynamo.config.force_unspec_int_unbacked_size_like_on_torchrec_kjt = True
        torch._dynamo.config.skip_torchrec = False
        torch.ops.import_module("fbgemm_gpu.sparse_ops")
        model, prepare = torch.compile(model), kjt_for_pt2_tracing

    def step(b):
        eager_step(lm, opt, b, device, model, prepare)

    return timed(step, batches, args.steps, args.warmup, device, args.profile_steps, mode)


def run_compiled(specs, batches, args, device) -> float:
    return run_eager(specs, batches, args, device, mode="compiled")


def graphed_step(specs, batches, args, device):
    """(model, the product's `GraphedTrainingStep` over eager's step: BCE, no L2)."""
    from twotower_lit.distributed.planning import graph_refusal
    from twotower_lit.graphs import GraphedTrainingStep
    from twotower_lit.layers import logits

    lm, opt = build_dmp(specs, args, device, for_capture=True)
    refusal = graph_refusal(dist.get_world_size(), {s.name: args.sharding for s in specs})  # the training job's rule
    if refusal is not None:
        raise RuntimeError(f"the graphed mode: {refusal}")
    multi = [s for s in specs if s.pooling == "mean"]

    def loss_fn(user, item, items, labels):
        loss = F.binary_cross_entropy_with_logits(logits(user, item, lm.model_cfg.exposure_dims), labels)
        if torch.cuda.is_current_stream_capturing():
            trace_backward(loss, CAPTURED_BACKWARD)
        return loss

    return lm, GraphedTrainingStep(lm.model, loss_fn, opt, batches[0].to(device), multi[0].name if multi else None,
                                   lm.parts.zero_rows([s.table for s in multi]))


CAPTURED_BACKWARD: List[str] = []  # the backward nodes started during a capture, in order (where a failed one stopped)


def trace_backward(loss: torch.Tensor, names: List[str]) -> None:
    """Append the name of every node of `loss`'s backward graph to `names` as it starts."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.register_prehook(lambda grads, name=node.name(): names.append(name))
        todo.extend(n for n, _ in node.next_functions)


def run_graphed(specs, batches, args, device) -> float:
    """eager's step captured once as a CUDA graph (after its warm-up steps) and replayed; each step
    copies its batch into the graph's input tensors (genres padded to a fixed capacity)."""
    if device.type != "cuda":
        raise RuntimeError("the graphed mode needs a GPU")
    if dist.get_world_size() > 1 and args.gradient_sync != "allreduce":
        raise RuntimeError("the graphed mode of several processes needs --gradient-sync allreduce (as the training "
                           "job's --cuda-graphs: DDP's reducer works on the host in every backward pass)")
    _, graphed = graphed_step(specs, batches, args, device)

    def step(b):
        reason = graphed.why_not(b)
        if reason is not None:
            raise ValueError(f"a batch the graph cannot take: {reason}")
        try:
            graphed(b)
        except Exception:
            print(f"[graphed] rank {dist.get_rank()}: the last backward nodes started in the capture: "
                  f"{CAPTURED_BACKWARD[-6:]} (of {len(CAPTURED_BACKWARD)})", flush=True)
            raise

    # the graph is captured on the step after its warm-up steps: all before the timed steps
    return timed(step, batches, args.steps, max(args.warmup, graphed.warmup + 1), device, args.profile_steps,
                 "graphed")


def check_graphed(specs, batches, args, device, steps: int) -> Dict[str, float]:
    """Train two models from the same initial weights on the same `steps` batches, eagerly and by
    the graphed step (its first steps eager warm-up, then replays), and return how far apart their
    losses and their final scores are."""
    from twotower_lit.layers import logits

    def scores(lm):
        with torch.no_grad():
            b = batches[0].to(device)
            return logits(*lm.model(b.features), lm.model_cfg.exposure_dims)

    torch.manual_seed(0)
    lm_e, opt_e = build_dmp(specs, args, device)
    torch.manual_seed(0)
    lm_g, step = graphed_step(specs, batches, args, device)
    start = (scores(lm_e) - scores(lm_g)).abs().max().item()
    order = [batches[k % len(batches)] for k in range(steps)]
    eager = [eager_step(lm_e, opt_e, b, device).detach() for b in order]
    graphed = [step(b) for b in order]
    eager_t, graphed_t = torch.stack(eager), torch.stack(graphed)
    return {"initial_score_diff": start, "loss_max_abs_diff": (eager_t - graphed_t).abs().max().item(),
            "final_score_max_abs_diff": (scores(lm_e) - scores(lm_g)).abs().max().item(),
            "loss_first": eager_t[0].item(), "loss_last_eager": eager_t[-1].item(),
            "loss_last_graphed": graphed_t[-1].item(), "replays": step.replays}


class _Task(nn.Module):
    """What TrainPipelineSparseDist drives: batch -> (loss, output)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        from twotower_lit.layers import logits

        u, i = self.model(batch.features)
        z = logits(u, i)
        return F.binary_cross_entropy_with_logits(z, batch.labels), z.detach()


def run_pipeline(specs, batches, args, device) -> float:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.distributed.planning import build_sharding_plan, describe_plan
    from twotower_lit.distributed.sharding import shard_model, sharded_parts
    from twotower_lit.training.module import TwoTowerModule

    lm = TwoTowerModule(specs, ModelConfig(embedding_dim=args.dim), OptimConfig())
    task = _Task(lm.model)
    pg = dist.group.WORLD
    plan = build_sharding_plan(task, pg, device.type, {}, args.sharding,
                               local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    lm.model = shard_model(task, plan, pg, device, args.gradient_sync, allreduce_precision=args.allreduce_precision)
    lm.on_sharded(sharded_parts(lm.model, describe_plan(plan)))
    opt = lm.configure_optimizers()["optimizer"]
    pipe = TrainPipelineSparseDist(lm.model, opt, device)

    def drive(n):
        it = (batches[k % len(batches)] for k in range(n))
        try:
            while True:
                pipe.progress(it)
        except StopIteration:
            pass

    drive(args.warmup)
    sync(device)
    pipe = TrainPipelineSparseDist(lm.model, opt, device)
    t0 = time.perf_counter()
    drive(args.steps)
    sync(device)
    return time.perf_counter() - t0


def run_plain(specs, batches, args, device) -> float:
    model = PlainTwoTower(specs, args.dim, [128, 64]).to(device)
    if dist.get_world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))

    def step(b):
        b = b.to(device, non_blocking=True)
        u, i = model(b.features)
        loss = F.binary_cross_entropy_with_logits((u * i).sum(1), b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, batches, args.steps, args.warmup, device, args.profile_steps, "plain")


def run_lightning(specs, batches, args, device, mode: str = "lightning") -> float:
    """The product's training path (LightningModule + TorchRecStrategy) on in-memory batches."""
    import lightning as L

    from twotower_lit.config import ModelConfig, OptimConfig
    from twotower_lit.distributed import TorchRecStrategy
    from twotower_lit.training.module import TwoTowerModule
    from twotower_lit.training.steps import EagerSteps

    profile_n = args.profile_steps if device.type == "cuda" or TRACE_DIR else 0

    class Timer(L.Callback):
        """Times steps warmup..warmup+steps, then profiles the next --profile-steps steps (from
        the first call at or past each mark: a multi-step call moves several steps at a time;
        the time is scaled to --steps steps)."""

        def on_train_batch_start(self, trainer, module, batch, idx):
            if trainer.global_step >= args.warmup and not hasattr(self, "t0"):
                sync(device)
                self.t0, self.step0 = time.perf_counter(), trainer.global_step
            if profile_n and trainer.global_step >= args.warmup + args.steps and not hasattr(self, "prof"):
                self.stop_clock(trainer)
                self.prof = profiler(device)
                self.prof.__enter__()

        def on_train_end(self, trainer, module):
            if hasattr(self, "prof"):
                sync(device)
                self.prof.__exit__(None, None, None)
                PROFILED[mode] = profile_report(self.prof, profile_n, device, mode)
            else:
                self.stop_clock(trainer)

        def stop_clock(self, trainer):
            """Seconds since the timing started, scaled to --steps steps."""
            sync(device)
            self.seconds = (time.perf_counter() - self.t0) * args.steps / (trainer.global_step - self.step0)

    total = args.warmup + args.steps + profile_n
    loader = torch.utils.data.DataLoader([batches[k % len(batches)] for k in range(total)], batch_size=None)
    model_cfg = ModelConfig(embedding_dim=args.dim)
    k = args.steps_per_execution if mode == "lightning_multistep" else 1
    lm = TwoTowerModule(specs, model_cfg, OptimConfig(), steps=EagerSteps(k))
    timer = Timer()
    strategy = TorchRecStrategy(table_kinds={s.name: args.sharding for s in specs}, gradient_sync=args.gradient_sync,
                                allreduce_precision=args.allreduce_precision)
    trainer = L.Trainer(accelerator=device.type if device.type == "cuda" else "cpu", devices=dist.get_world_size(),
                        strategy=strategy, max_steps=total, logger=False,
                        callbacks=[timer], enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False)  # every rank already has its own batches
    trainer.fit(lm, train_dataloaders=loader)
    return timer.seconds


def run_lightning_multistep(specs, batches, args, device) -> float:
    return run_lightning(specs, batches, args, device, mode="lightning_multistep")


MODES = {"lightning": run_lightning, "lightning_multistep": run_lightning_multistep, "eager": run_eager,
         "compiled": run_compiled, "graphed": run_graphed, "pipeline": run_pipeline, "plain": run_plain}


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="ml-1m", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=8192, help="rows per step per rank")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sharding", default="table_wise",
                   help="as the training job's --sharding (auto: the planner picks)")
    p.add_argument("--gradient-sync", default="allreduce", choices=GRADIENT_SYNCS,
                   help="as the training job's --gradient-sync (several processes: how the gradients of the towers "
                        "and replicated tables are averaged)")
    p.add_argument("--allreduce-precision", default="fp32", choices=ALLREDUCE_PRECISIONS,
                   help="as the training job's --allreduce-precision (what those gradients are sent as)")
    p.add_argument("--modes", default="lightning,lightning_multistep,eager,pipeline,plain")
    p.add_argument("--steps-per-execution", type=int, default=8, help="K of the lightning_multistep mode")
    p.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"),
                   help="torch.set_float32_matmul_precision for every mode (high: TF32 tensor cores, the "
                        "training job's default on GPUs; highest: full float32)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="on GPUs (or with --trace): also profile this many steps of every mode but pipeline "
                        "(GPU ms and launches per step; host syncs per step for eager and plain)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="with --profile-steps: also record host time, print the costliest ops and write "
                        "Chrome traces to DIR")
    p.add_argument("--check-graphed", type=int, default=0, metavar="STEPS",
                   help="also train the same model eagerly and by graph replays for STEPS batches and print how "
                        "far apart their losses and scores are")
    p.add_argument("--json", default=None, help="append the results as JSON lines to this file")
    args = p.parse_args(argv)
    global TRACE_DIR
    TRACE_DIR = args.trace

    torch.set_float32_matmul_precision(args.matmul_precision)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from twotower_lit.data.batches import KJTBuilder

    users, items = SHAPES[args.shape]
    specs = feature_specs(users, items)
    builder = KJTBuilder(feature_tables(users, items), [s.name for s in specs if s.tower == "user"],
                         [s.name for s in specs if s.tower == "item"])
    batches = make_batches(builder, users, items, args.batch, 8, seed=rank, pin=cuda)
    results: Dict[str, Dict] = {}
    modes = args.modes.split(",")
    # Every mode is timed first, then profiled in a second pass, so that no timing runs in a
    # process where the profiler (its GPU activity tracing) has already been switched on.
    timing = argparse.Namespace(**{**vars(args), "profile_steps": 0})
    for mode in modes:
        torch.manual_seed(0)
        try:
            seconds = MODES[mode](specs, batches, timing, device)
            rate = args.steps * args.batch * world / seconds
            results[mode] = {"samples_per_s": rate, "ms_per_step": seconds / args.steps * 1e3}
            if mode == "compiled":  # how much of the step the compiler took: graphs and graph breaks
                from torch._dynamo.utils import counters

                results[mode]["graphs"] = counters["stats"]["unique_graphs"]
                results[mode]["graph_breaks"] = sum(counters["graph_break"].values())
                if rank == 0:
                    for reason, n in counters["graph_break"].items():
                        print(f"[compiled] graph break x{n}: {reason.splitlines()[0][:200]}")
        except Exception as e:  # a mode that fails is reported (its traceback on stderr), the others still run
            traceback.print_exc()
            results[mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if cuda:
            torch.cuda.empty_cache()
    if args.profile_steps and (cuda or TRACE_DIR):
        for mode in modes:
            if "error" not in results[mode] and mode != "pipeline":
                torch.manual_seed(0)
                MODES[mode](specs, batches, args, device)
                results[mode].update(PROFILED.get(mode, {}))
                if cuda:
                    torch.cuda.empty_cache()
    if args.check_graphed:
        try:
            results["graphed_check"] = check_graphed(specs, batches, args, device, args.check_graphed)
        except Exception as e:
            results["graphed_check"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else f"CPU x{os.cpu_count()}"
        print(f"\n{args.shape} batch/rank={args.batch:,} ranks={world} device={name} sharding={args.sharding}"
              + (f" gradient-sync={args.gradient_sync} allreduce={args.allreduce_precision}" if world > 1 else ""))
        for mode, r in results.items():
            if mode == "graphed_check":
                print(f"  graphed against eager: {r}")
            elif "error" in r:
                print(f"  {mode:20s} FAILED {r['error']}")
            else:
                syncs = f", {r['syncs_per_step']:.1f} host syncs" if "syncs_per_step" in r else ""
                work = (f"  (GPU busy {r['gpu_ms_per_step']:.2f} ms/step, {r['launches_per_step']:.0f} launches{syncs})"
                        if "gpu_ms_per_step" in r else "")
                if "graphs" in r:
                    work += f"  ({r['graphs']} compiled graphs, {r['graph_breaks']} graph breaks)"
                print(f"  {mode:20s} {r['samples_per_s'] / 1e6:8.3f} M samples/s  "
                      f"{r['ms_per_step']:7.2f} ms/step{work}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"shape": args.shape, "batch": args.batch, "world": world, "device": name,
                                    "sharding": args.sharding, "gradient_sync": args.gradient_sync,
                                    "allreduce_precision": args.allreduce_precision,
                                    "results": results}) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
