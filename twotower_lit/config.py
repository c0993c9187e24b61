"""Typed configuration for every job, and the one place its defaults live.

The command-line interfaces, the SageMaker hyperparameters and the notebooks all build these
dataclasses; `add_arguments` / `from_namespace` turn a dataclass into argparse options
(field ``foo_bar`` becomes ``--foo-bar``) so a default is never written twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

DATASETS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m", "ml-latest", "ml-latest-small")
# how several processes average the gradients of the towers and replicated tables (strategy.DataParallelAcrossRanks)
GRADIENT_SYNCS = ("allreduce", "ddp")
ALLREDUCE_PRECISIONS = ("fp32", "bf16")  # what those gradients travel as

T = TypeVar("T")


def _opt(default: Any, help: str, choices: Optional[tuple] = None, **kw: Any) -> Any:
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class PrepareConfig:
    """How raw MovieLens ratings become prepared Parquet shards (`entrypoints.prepare`)."""

    data_dir: Optional[str] = _opt(None, "raw MovieLens directory (local) to prepare")
    output_dir: Optional[str] = _opt(None, "where the prepared shards go: a local directory or s3://bucket/prefix")
    dataset: Optional[str] = _opt(None, "layout of --data-dir; detected from its files when omitted", DATASETS)
    download: Optional[str] = _opt(None, "download this GroupLens set (checksum verified, cached)", DATASETS)
    cache_dir: str = _opt("~/.cache/twotower_lit", "where downloads are cached")
    sha256: Optional[str] = _opt(None, "SHA-256 of the --download zip you trust: required for ml-latest (re-issued "
                                       "over time, so no digest is pinned); replaces the pinned one of other sets")
    synthetic: Optional[int] = _opt(None, "generate a synthetic MovieLens set with this many ratings")
    synthetic_layout: str = _opt("ml-1m", "file layout of the synthetic set", DATASETS)
    split: str = _opt("random", "random: per user 80/10/10; temporal: per user last -> test, second last -> val",
                      ("random", "temporal"))
    val_fraction: float = _opt(0.1, "random split: share of each user's ratings in validation")
    test_fraction: float = _opt(0.1, "random split: share of each user's ratings in test")
    seed: int = _opt(0, "seed for splits (and synthetic data)")
    threshold: float = _opt(4.0, "ratings >= threshold are positives (label 1)")
    neutral: str = _opt("keep", "rows with 3 <= rating < threshold: keep (label 0) or drop", ("keep", "drop"))
    on_bad_lines: str = _opt("error", "error: stop at the first malformed line; skip: skip and count",
                             ("error", "skip"))
    shard_rows: int = _opt(1_000_000, "maximum rows per Parquet shard")
    min_shards: int = _opt(8, "minimum shards per split (so ranks and loader workers each get their own)")
    zip_prefix: int = _opt(3, "number of leading zip-code characters kept as the user's zip feature")


@dataclass
class ModelConfig:
    """Shape of the two-tower model."""

    embedding_dim: int = _opt(64, "dimension of every embedding table")
    user_layers: List[int] = _opt([128, 64], "user tower MLP widths; the last is the output dimension")
    item_layers: List[int] = _opt([128, 64], "item tower MLP widths; the last must equal the user tower's")
    side_features: bool = _opt(True, "use side features (gender, age, occupation, zip; genres, year) where present")
    # measured by `python -m benchmarks.quality` (ml-100k, 4 seeds): 16 of 64 raised test AUC from
    # 0.7819 to 0.7983 and Recall@10 from 0.2175 to 0.2339 over one shared score
    exposure_dims: int = _opt(16, "with --loss both: the last this many dimensions of the tower outputs enter only "
                                  "the retrieval score (which movies a user rates), the others also the liking "
                                  "logit of the BCE term and AUC; 0: one score for both")


@dataclass
class OptimConfig:
    """Fused embedding optimizer + dense optimizer, each with a schedule."""

    embedding_optimizer: str = _opt("rowwise_adagrad", "optimizer fused into the embedding backward",
                                    ("rowwise_adagrad", "adam", "sgd"))
    embedding_lr: float = _opt(0.05, "embedding learning rate")
    dense_optimizer: str = _opt("adam", "optimizer of the tower MLPs", ("adam", "adamw", "sgd"))
    dense_lr: float = _opt(1e-3, "dense learning rate")
    weight_decay: float = _opt(0.0, "dense weight decay")
    lr_schedule: str = _opt("constant", "learning-rate schedule for both optimizers",
                            ("constant", "cosine", "linear"))
    warmup_steps: int = _opt(0, "linear warm-up steps of the schedule")


@dataclass
class TrainConfig:
    """Everything `python -m entrypoints.train` needs; also the SageMaker hyperparameters."""

    data_dir: Optional[str] = _opt(None, "raw MovieLens directory (prepared first) or a prepared one; "
                                         "default: a synthetic ml-1m-shaped set")
    output_dir: Optional[str] = _opt(None, "run directory (default ./outputs/<run-name>)")
    run_name: Optional[str] = _opt(None, "MLflow run name and default output folder name")
    max_epochs: int = _opt(8, "training epochs")
    batch_size: int = _opt(1024, "rated rows per batch per rank (negatives come on top)")
    eval_batch_size: int = _opt(8192, "rows per validation/test batch")
    seed: int = _opt(0, "global seed (data order, negatives, initialisation)")
    negatives: int = _opt(0, "per rated row, this many unrated items labelled 0, drawn afresh each epoch")
    negative_sampling: str = _opt("uniform", "how negatives are drawn", ("uniform", "popularity"))
    loss: str = _opt("both", "bce: BCE on rated rows and negatives; softmax: in-batch sampled softmax with log-Q "
                            "correction (negatives join as extra candidates); both: BCE on rated rows + "
                            "softmax_weight x softmax (see twotower_lit.losses)", ("bce", "softmax", "both"))
    # defaults measured by `python -m benchmarks.quality` (ml-100k: AUC of the rated-pair BCE model,
    # Recall@10 well above the uniform-negatives model); --loss bce --negatives 0 is the workshop's framing
    softmax_weight: float = _opt(0.22, "--loss both: weight of the softmax term")
    softmax_temperature: float = _opt(0.5, "softmax logits are dot products divided by this")
    # 1024 = the batch size the softmax defaults were tuned at: a larger --batch-size keeps the
    # softmax's candidate count (so its weight and temperature stay right) and its cost linear
    softmax_rows: int = _opt(1024, "the in-batch softmax runs over blocks of this many rated rows (each block's items "
                                   "are its candidates; 0: the whole batch, whose cost grows with its square)")
    vector_l2: float = _opt(3e-3, "L2 penalty on the user and item tower outputs of each row (every loss)")
    accelerator: str = _opt("auto", "cpu, gpu or auto")
    devices: int = _opt(1, "processes (CPU) or GPUs per node")
    num_nodes: int = _opt(1, "nodes")
    # On a 2 x H200 machine (32M ratings, 3 epochs) Lightning's launcher started the second rank
    # about 30 s after the first: 94 s of wall time against 63 s under torchrun (benchmarks/GPU_RESULTS.md)
    launcher: str = _opt("auto", "how the processes of several --devices on one node start when no launcher "
                                 "(torchrun, SLURM, MPI) started them: torchrun (this command restarts itself under "
                                 "torchrun, every rank at once) or lightning (Lightning starts the other ranks when "
                                 "training begins, after this one's start-up); auto: torchrun on GPUs, lightning on "
                                 "CPUs", ("auto", "torchrun", "lightning"))
    num_workers: int = _opt(0, "data-loader worker processes per rank")
    # auto: a GPU steps 65,536 rows in 1.4-2.7 ms (24-47 M rows/s), which the streaming loader
    # does not feed (about 4 M rows/s with 12 workers on an H200 machine; benchmarks/GPU_RESULTS.md)
    data_on_device: str = _opt("auto", "keep the training split in accelerator memory and build batches there (no "
                                       "loader workers or copies; rated rows only, so --negatives 0); auto: on GPUs "
                                       "when --negatives is 0 and the split takes at most a quarter of the GPU's "
                                       "memory", ("auto", "true", "false"))
    tf32: bool = _opt(True, "on GPUs: float32 matmuls (the towers) on TF32 tensor cores, "
                            "torch.set_float32_matmul_precision('high'); false: full float32")
    # table_wise: each table whole on one rank, the tables balanced over ranks by the planner. On 2
    # H200s (ML-32M shape, 64k rows per GPU) it trained 1.5-1.7x faster than the planner's own pick
    # ('auto'; benchmarks/train_throughput.py --sharding); a table too large for one device needs row_wise
    sharding: str = _opt("table_wise", "embedding sharding ('auto': the TorchRec planner picks per table, never "
                                       "data_parallel; data_parallel: every table replicated on every rank)",
                         ("auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"))
    table_sharding: Optional[str] = _opt(None, "per-table overrides of --sharding, e.g. "
                                               "'user:row_wise,genres:table_wise'")
    # On 2 H200s (ML-32M shape, 65,536 rows per GPU) replicating its tables (74 MB together) trained
    # 16-46% faster end to end than table_wise (two machines); on one GPU replication was slower,
    # and on CPU processes (gloo) it is not measured, so the rule needs more than one GPU
    data_parallel_below_mb: float = _opt(64.0, "with more than one GPU: tables of at most this many MB (rows x "
                                               "dim x 4 bytes) not named by --table-sharding are replicated on "
                                               "every GPU (data_parallel: no all-to-all; a resumed run keeps its "
                                               "checkpoint's replicated tables instead); 0: off")
    # allreduce: one all-reduce of the towers' and replicated tables' gradients after the backward
    # pass, instead of TorchRec's DDP wrappers (see DataParallelAcrossRanks and benchmarks/GPU_RESULTS.md)
    gradient_sync: str = _opt("allreduce", "with several processes, how the gradients of the dense towers and of "
                                           "replicated (data_parallel) tables are averaged: allreduce (one flat "
                                           "all-reduce per step) or ddp (TorchRec's DDP wrappers: overlap the "
                                           "backward pass, for large dense towers)",
                              GRADIENT_SYNCS)
    allreduce_precision: str = _opt("fp32", "with several processes, what those gradients are all-reduced as: fp32, "
                                            "or bf16 (half the bytes, summed in bfloat16; TorchRec's "
                                            "allreduce_comm_precision)", ALLREDUCE_PRECISIONS)
    collective_timeout_s: int = _opt(600, "seconds a rank waits in a collective before failing (a lost peer)")
    eval_k: int = _opt(10, "cut-off of Recall@k / NDCG@k")
    mlflow_uri: Optional[str] = _opt(None, "MLflow tracking URI (default: sqlite database in the output dir; "
                                               "'none': no tracking)")
    experiment_name: str = _opt("twotower-movielens", "MLflow experiment")
    registered_model_name: Optional[str] = _opt("twotower-movielens", "MLflow registered model name ('' = none)")
    checkpoint_dir: Optional[str] = _opt(None, "sharded checkpoints (default OUTPUT/checkpoints)")
    checkpoint_every_n_steps: int = _opt(0, "also checkpoint every N steps (0 = epoch ends only)")
    train_pipeline: str = _opt("off", "sparse_dist: train through TorchRec's TrainPipelineSparseDist (the next "
                               "batches' copy to the device and embedding all-to-all overlap this one's compute); "
                               "off: Lightning's own loop", ("off", "sparse_dist"))
    # Keras' steps_per_execution: on a GPU a 64k-row step is a few milliseconds of host work, of
    # which Lightning's per-batch loop (hooks, progress, logging) is a fixed share; K steps per call
    # pay it once. 16 on GPUs: end to end on H200s it was faster in five of six interleaved pairs
    # of runs (1 and 2 GPUs, two machines), by 13% on average (benchmarks/GPU_RESULTS.md)
    steps_per_execution: int = _opt(0, "optimizer steps (batches) per Lightning training_step call, each step as "
                                       "with 1 (the same batches, results and checkpoints; train_loss logged every "
                                       "multiple of it from 10); 0: 16 on GPUs, 1 on CPUs (where a step's compute "
                                       "dwarfs the loop's overhead)")
    # The eager GPU step is bound by the host launching ~100 kernels; replaying the captured step
    # launches them at once: 1.51 against 3.3-3.9 ms per 64k-row step on one H200, 2.00 against
    # 3.4 ms per 64k-row step on each of two (twotower_lit/graphs.py)
    cuda_graphs: str = _opt("auto", "capture the training step as a CUDA graph and replay it for every batch of the "
                                    "same shape (the same training; genres padded with a zero vector); needs GPUs, "
                                    "with several processes every table replicated (--data-parallel-below-mb, "
                                    "--sharding data_parallel) and --gradient-sync allreduce, a constant learning "
                                    "rate (--lr-schedule constant, --warmup-steps 0), --embedding-optimizer "
                                    "rowwise_adagrad or sgd and --train-pipeline off; auto: on where these hold, "
                                    "off otherwise",
                            ("auto", "on", "off"))
    resume: Optional[str] = _opt(None, "'auto' (latest checkpoint in the checkpoint dir) or a checkpoint path")
    package: bool = _opt(False, "also write OUTPUT/model.tar.gz in the SageMaker layout")
    progress: bool = _opt(True, "show a progress bar")
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class ServeConfig:
    """The inference server (`python -m entrypoints.serve`, the container's `serve`) and the handler
    functions; in a SageMaker container every field can also come from ``TWOTOWER_<FIELD>``."""

    model_dir: Optional[str] = _opt(None, "exported model directory (default: $SM_MODEL_DIR or /opt/ml/model)")
    host: str = _opt("127.0.0.1", "interface to listen on (the serving image sets TWOTOWER_HOST=0.0.0.0)")
    port: int = _opt(8080, "port to listen on (SageMaker's container contract: 8080)")
    uds: Optional[str] = _opt(None, "listen on this Unix socket instead of host:port")
    workers: int = _opt(1, "server processes, each with its own copy of the model")
    num_threads: int = _opt(1, "torch compute threads per worker (more threads on few cores raise tail latency)")
    max_concurrency: int = _opt(64, "invocations in flight per worker; beyond it, 503 at once")
    request_timeout: float = _opt(60.0, "seconds an invocation may take before a 504 (SageMaker allows 60)")
    header_timeout: float = _opt(5.0, "seconds for a request line and headers, from their first byte; then 408")
    body_timeout: float = _opt(5.0, "seconds for a request body, after its headers; then 408 (no compute slot held)")
    max_body_bytes: int = _opt(6 * 1024 * 1024, "largest request body; larger ones get 413 (SageMaker: 6 MB)")
    max_batch: int = _opt(1000, "most users in one request")
    max_k: int = _opt(100, "largest k a request may ask for")
    default_k: int = _opt(10, "k when a request gives none")
    search: str = _opt("exact", "top-k search: exact (torch.topk) or faiss (approximate inner-product HNSW index)",
                       ("exact", "faiss"))
    endpoint_name: str = _opt("local-endpoint", "endpoint name in data-capture paths")
    variant_name: str = _opt("production", "this variant's name in data capture")
    shadow_model_dir: Optional[str] = _opt(None, "serve this model as a shadow variant (its own process)")
    shadow_url: Optional[str] = _opt(None, "mirror to an already running shadow server (http://host:port)")
    shadow_variant_name: str = _opt("shadow", "the shadow variant's name in data capture")
    shadow_sampling_percent: float = _opt(100.0, "share of requests mirrored to the shadow variant (0-100)")
    shadow_timeout: float = _opt(2.0, "seconds a shadow call may take before it counts as failed")
    shadow_max_in_flight: int = _opt(32, "shadow calls in flight; beyond it a request is not mirrored")
    capture_dir: Optional[str] = _opt(None, "write SageMaker-format data capture (JSON lines) under this folder")
    capture_sampling_percent: float = _opt(100.0, "share of requests captured (0-100)")
    capture_max_payload_bytes: int = _opt(1024 * 1024, "larger request/response bodies are captured cut to this "
                                          "size, the record saying so and the original size")
    graceful_timeout: float = _opt(30.0, "seconds to finish in-flight requests after SIGTERM")
    keep_alive: int = _opt(75, "idle keep-alive seconds (above the 60 s of SageMaker's front end)")
    log_level: str = _opt("info", "log level", ("critical", "error", "warning", "info", "debug"))


@dataclass
class LoadConfig:
    """The traffic generator (`python -m entrypoints.load`)."""

    url: str = _opt("http://127.0.0.1:8080/invocations", "where requests go")
    data_dir: Optional[str] = _opt(None, "prepared data directory whose split's users are replayed")
    split: str = _opt("test", "split whose users are replayed", ("train", "val", "test"))
    user_ids: Optional[str] = _opt(None, "raw user ids instead of --data-dir: '1,2,3' or @file (one per line)")
    rate: float = _opt(50.0, "requests per second, Poisson arrivals (0: as fast as --concurrency allows)")
    concurrency: int = _opt(8, "requests in flight at most")
    requests: int = _opt(1000, "stop after this many requests")
    duration: float = _opt(60.0, "stop after this many seconds")
    batch: int = _opt(1, "users per request")
    k: int = _opt(10, "k of every request")
    timeout: float = _opt(10.0, "client timeout per request (seconds)")
    seed: int = _opt(0, "seed of the user order and arrival times")
    output: Optional[str] = _opt(None, "also write the summary as JSON here")


@dataclass
class ShadowReportConfig:
    """The shadow-test report (`python -m entrypoints.shadow_report`) and its verdict thresholds."""

    capture_dir: Optional[str] = _opt(None, "data-capture folder written by the server (required)")
    data_dir: Optional[str] = _opt(None, "prepared data directory: its test positives give Recall@k / NDCG@k")
    output_dir: Optional[str] = _opt(None, "where report.json, report.md and the plots go (default CAPTURE/report)")
    endpoint_name: Optional[str] = _opt(None, "endpoint to report on (default: the only one captured)")
    min_requests: int = _opt(200, "fewer joined production/shadow requests than this: inconclusive")
    min_labelled_users: int = _opt(100, "fewer users with held-out positives than this: inconclusive")
    max_error_rate_increase: float = _opt(0.005, "shadow 5xx/timeout rate may exceed production's by at most this")
    max_latency_ratio: float = _opt(1.25, "shadow p99 latency may be at most this times production's")
    equivalence_margin: float = _opt(0.005, "NDCG@k differences whose 95% interval lies within +-this: keep")
    bootstrap: int = _opt(1000, "bootstrap resamples for the NDCG@k difference's interval")
    seed: int = _opt(0, "bootstrap seed")


# ---------------------------------------------------------------------------------------------
# dataclass <-> argparse


def parse_bool(value: Any) -> bool:
    """Lenient boolean: true/false, 1/0, yes/no, on/off (SageMaker SDKs encode booleans differently)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def _int_list(value: Any) -> List[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        return [int(v) for v in str(value).replace("[", "").replace("]", "").replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like '128,64', got {value!r}") from e


def _optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def iter_fields(cls: Type[Any]):
    """Leaf fields of a (nested) config dataclass: yields (path, field, type)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            for path, sub, stp in iter_fields(tp):
                yield (f.name,) + path, sub, stp
        else:
            yield (f.name,), f, tp


def add_arguments(parser: argparse.ArgumentParser, cls: Type[Any], only: Optional[set] = None) -> None:
    """Add one `--option` per leaf name of `cls` (nested dataclasses are flattened; a name that
    occurs at several depths, like `seed`, is one option that sets all of them)."""
    seen = set()
    for path, f, tp in iter_fields(cls):
        if (only is not None and path[-1] not in only) or path[-1] in seen:
            continue
        seen.add(path[-1])
        flag = "--" + path[-1].replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse formats help
        kw: Dict[str, Any] = dict(dest=path[-1], default=argparse.SUPPRESS, help=text)
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            kw.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(tp) in (list, List):
            kw["type"] = _int_list
        else:
            kw["type"] = tp
        parser.add_argument(flag, **kw)


def from_dict(cls: Type[T], values: Dict[str, Any]) -> T:
    """Build `cls` from flat `{leaf_name: value}` (unknown names raise, naming them)."""
    leaves: Dict[str, list] = {}
    for path, f, tp in iter_fields(cls):
        leaves.setdefault(path[-1], []).append((path, tp))
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise ValueError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}")
    cfg = cls()
    for name, value in values.items():
        for path, tp in leaves[name]:
            if value is not None:
                if tp is bool:
                    value = parse_bool(value)
                elif typing.get_origin(tp) in (list, List):
                    value = _int_list(value)
                elif tp in (int, float, str):
                    value = tp(value)
            target = cfg
            for p in path[:-1]:
                target = getattr(target, p)
            setattr(target, name, value)
    return cfg


def from_namespace(cls: Type[T], ns: argparse.Namespace) -> T:
    return from_dict(cls, vars(ns))


def to_flat_dict(cfg: Any) -> Dict[str, Any]:
    """`{leaf_name: value}` of a config (for MLflow params and SageMaker hyperparameters)."""
    out: Dict[str, Any] = {}
    for path, _, _ in iter_fields(type(cfg)):
        if path[-1] in out:
            continue
        value = cfg
        for p in path:
            value = getattr(value, p)
        out[path[-1]] = value
    return out
