"""Typed configuration for every job, and the one place its defaults live.

The command-line interfaces, the SageMaker hyperparameters and the notebooks all build these
dataclasses (`twotower_lit.options` turns them into options). `TrainConfig` is in sections
(``cfg.data.batch_size``), but its option names, MLflow params and SageMaker hyperparameters stay
flat (``--batch-size``, ``batch_size``): the section is where a value lives, not part of its name.
Options that no longer exist are listed in ``TrainConfig.RETIRED``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple

from twotower_lit.options import Retired
from twotower_lit.options import opt as _opt
from twotower_lit.options import section as _section

DATASETS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m", "ml-latest", "ml-latest-small")
# how several processes average the gradients of the towers and replicated tables (strategy.DataParallelAcrossRanks)
GRADIENT_SYNCS = ("allreduce", "ddp")
ALLREDUCE_PRECISIONS = ("fp32", "bf16")  # what those gradients travel as



@dataclass
class PrepareConfig:
    """How raw MovieLens ratings become prepared Parquet shards (`entrypoints.prepare`)."""

    data_dir: Optional[str] = _opt(None, "raw MovieLens directory (local) to prepare")
    output_dir: Optional[str] = _opt(None, "where the prepared shards go: a local directory or s3://bucket/prefix")
    dataset: Optional[str] = _opt(None, "layout of --data-dir; detected from its files when omitted", DATASETS)
    download: Optional[str] = _opt(None, "download this GroupLens set (checksum verified, cached)", DATASETS)
    cache_dir: str = _opt("~/.cache/twotower_lit", "where downloads are cached")
    sha256: Optional[str] = _opt(None, "SHA-256 of the --download zip you trust (required for ml-latest)",
                                 doc="ml-latest is re-issued over time, so no digest is pinned for it; for the other "
                                     "sets this replaces the pinned digest")
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
class DataConfig:
    """Which prepared data is read and how it becomes batches."""

    data_dir: Optional[str] = _opt(None, "raw or prepared MovieLens directory (default: a synthetic ml-1m-shaped set)",
                                   doc="a raw directory is prepared first (see the data preparation options)")
    batch_size: int = _opt(1024, "rated rows per batch per rank (negatives come on top)")
    eval_batch_size: int = _opt(8192, "rows per validation/test batch")
    negatives: int = _opt(0, "per rated row, this many unrated items labelled 0, drawn afresh each epoch")
    negative_sampling: str = _opt("uniform", "how negatives are drawn", ("uniform", "popularity"),
                                  doc="uniform over the items, or by training popularity raised to "
                                      "--negative-power; the softmax corrects each candidate by its source's "
                                      "probability (mixed negative sampling)")
    negative_power: float = _opt(1.0, "popularity sampling: counts raised to this power",
                                 doc="below 1 the distribution is smoothed toward uniform (0.5, 0.75)")
    num_workers: int = _opt(0, "data-loader worker processes per rank")


@dataclass
class ModelConfig:
    """Shape of the two-tower model."""

    embedding_dim: int = _opt(64, "dimension of every embedding table")
    user_layers: List[int] = _opt([128, 64], "user tower MLP widths; the last is the output dimension")
    item_layers: List[int] = _opt([128, 64], "item tower MLP widths; the last must equal the user tower's")
    side_features: bool = _opt(True, "use side features (gender, age, occupation, zip; genres, year) where present")
    # separate retrieval dimensions raised both AUC and Recall@10 over one shared score
    # (`python -m benchmarks.quality`; figures in benchmarks/CONFIG_DEFAULTS.md)
    exposure_dims: int = _opt(16, "--loss both: last N output dims score retrieval only; 0: one shared score",
                              doc="with --loss both, the last this many dimensions of the tower outputs enter only "
                                  "the retrieval score (which movies a user rates), the others also the liking logit "
                                  "of the BCE term and AUC; 0: one score for both")


@dataclass
class LossConfig:
    """The training objective (see twotower_lit.losses)."""

    kind: str = _opt("both", "objective: bce, in-batch softmax, or both", ("bce", "softmax", "both"), option="loss",
                     doc="bce: BCE on rated rows and negatives; softmax: in-batch sampled softmax with log-Q "
                         "correction (negatives join as extra candidates); both: BCE on rated rows + "
                         "softmax_weight x softmax (see twotower_lit.losses)")
    # defaults measured by `python -m benchmarks.quality` (ml-100k: AUC of the rated-pair BCE model,
    # Recall@10 well above the uniform-negatives model); --loss bce --negatives 0 is the workshop's framing
    softmax_weight: float = _opt(0.22, "--loss both: weight of the softmax term")
    softmax_temperature: float = _opt(0.5, "softmax logits are dot products divided by this")
    # 1024 = the batch size the softmax defaults were tuned at: a larger --batch-size keeps the
    # softmax's candidate count (so its weight and temperature stay right) and its cost linear
    softmax_rows: int = _opt(1024, "in-batch softmax over blocks of this many rated rows (0: the whole batch)",
                             doc="each block's items are its candidates; 0: the whole batch, whose cost grows with "
                                 "its square")
    vector_l2: float = _opt(3e-3, "L2 penalty on the user and item tower outputs of each row (every loss)")
    softmax_candidates: str = _opt("auto", "the softmax's candidates: every rank's, or each rank's own",
                                   ("auto", "global", "local"),
                                   doc="global: block b of each rank is scored against block b of every rank, so "
                                       "N processes train what one process trains over N times the rows; local: "
                                       "each rank's own blocks; auto: global with several processes")


@dataclass
class OptimConfig:
    """Fused embedding optimizer + dense optimizer, each with a schedule."""

    max_epochs: int = _opt(8, "training epochs")
    # the last epoch is not the best one where a model overfits (ml-latest-small after epoch 3);
    # Recall@k alone could pick an epoch that bought retrieval with AUC, hence the guard
    best_metric: str = _opt("recall", "validation metric of the epoch that is tested and exported ('last': the last)",
                            ("recall", "ndcg", "mrr", "hit_rate", "auc", "logloss", "accuracy", "last"),
                            doc="recall, ndcg, mrr and hit_rate at --eval-k; logloss is minimised, the others "
                                "maximised. Among the epochs whose validation AUC is within --best-auc-tolerance of "
                                "the best validation AUC of the run, the one with the best value of this metric is "
                                "tested and exported (the earliest of equals); last: the last epoch, as trained")
    best_auc_tolerance: float = _opt(0.005, "--best-metric passes over epochs this far below the best val AUC",
                                     doc="the AUC guard of --best-metric (validation AUC, all epochs of the run; "
                                         "negative: no guard)")
    early_stopping_patience: int = _opt(0, "stop after this many epochs without a new best epoch (0: off)",
                                        doc="the best epoch as --best-metric chooses it, judged after each "
                                            "validation; the best epoch is still the one exported")
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
class DistributedConfig:
    """Processes, devices, and how the tables and gradients are spread over them."""

    accelerator: str = _opt("auto", "cpu, gpu or auto")
    devices: int = _opt(1, "processes (CPU) or GPUs per node")
    num_nodes: int = _opt(1, "nodes")
    # Lightning's launcher starts the other ranks only after this one's start-up, which cost
    # multi-GPU runs much of their wall time (benchmarks/CONFIG_DEFAULTS.md)
    launcher: str = _opt("auto", "how one node's --devices processes start: auto, torchrun or lightning",
                         ("auto", "torchrun", "lightning"),
                         doc="used when no launcher (torchrun, SLURM, MPI) started them: torchrun (this command "
                             "restarts itself under torchrun, every rank at once) or lightning (Lightning starts the "
                             "other ranks when training begins, after this one's start-up); auto: torchrun on GPUs, "
                             "lightning on CPUs")
    # table_wise: each table whole on one rank, balanced over ranks by the planner; on GPUs it trained
    # faster than the planner's own pick (benchmarks/CONFIG_DEFAULTS.md); a table too large for one
    # device needs row_wise
    sharding: str = _opt("table_wise", "embedding sharding of every table (see --table-sharding)",
                         ("auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"),
                         doc="auto: the TorchRec planner picks per table, never data_parallel; data_parallel: every "
                             "table replicated on every rank")
    table_sharding: Optional[str] = _opt(None, "per-table overrides of --sharding: 'user:row_wise,genres:table_wise'")
    # replicating small tables trained faster end to end on two GPUs and slower on one; on CPU
    # processes (gloo) it is not measured, so the rule needs more than one GPU (benchmarks/CONFIG_DEFAULTS.md)
    data_parallel_below_mb: float = _opt(64.0, "several GPUs: replicate tables of at most this many MB (0: off)",
                                         doc="with more than one GPU: tables of at most this many MB (rows x dim x "
                                             "4 bytes) not named by --table-sharding are replicated on every GPU "
                                             "(data_parallel: no all-to-all; a resumed run keeps its checkpoint's "
                                             "replicated tables instead); 0: off")
    # allreduce: one all-reduce of the towers' and replicated tables' gradients after the backward
    # pass, instead of TorchRec's DDP wrappers (see DataParallelAcrossRanks and benchmarks/GPU_RESULTS.md)
    gradient_sync: str = _opt("allreduce", "how dense and replicated gradients are averaged over processes",
                              GRADIENT_SYNCS,
                              doc="with several processes, how the gradients of the dense towers and of replicated "
                                  "(data_parallel) tables are averaged: allreduce (one flat all-reduce per step) or "
                                  "ddp (TorchRec's DDP wrappers: overlap the backward pass, for large dense towers)")
    allreduce_precision: str = _opt("fp32", "what those gradients are all-reduced as", ALLREDUCE_PRECISIONS,
                                    doc="with several processes: fp32, or bf16 (half the bytes, summed in bfloat16; "
                                        "TorchRec's allreduce_comm_precision)")
    collective_timeout_s: int = _opt(600, "seconds a rank waits in a collective before failing (a lost peer)")


@dataclass
class PerformanceConfig:
    """Speed settings that leave the training itself unchanged."""

    # auto: a GPU steps large batches faster than the streaming loader feeds them
    # (benchmarks/CONFIG_DEFAULTS.md)
    data_on_device: str = _opt("auto", "keep the training split in accelerator memory, batches built there",
                               ("auto", "true", "false"),
                               doc="no loader workers or copies; rated rows only, so --negatives 0; auto: on GPUs "
                                   "when --negatives is 0 and the split takes at most a quarter of the GPU's memory")
    tf32: bool = _opt(True, "on GPUs: float32 matmuls (the towers) on TF32 tensor cores; false: full float32",
                      doc="torch.set_float32_matmul_precision('high')")
    # Keras' steps_per_execution: on a GPU Lightning's per-batch loop (hooks, progress, logging) is
    # a fixed share of a step's host work, which K steps per call pay once (benchmarks/CONFIG_DEFAULTS.md)
    steps_per_execution: int = _opt(0, "optimizer steps per training_step call; 0: 16 on GPUs, 1 on CPUs",
                                    doc="each step as with 1 (the same batches, results and checkpoints; train_loss "
                                        "logged every multiple of it from 10); on CPUs a step's compute dwarfs the "
                                        "loop's overhead")
    # the eager GPU step is bound by the host launching ~100 kernels; replaying the captured step
    # launches them at once (benchmarks/CONFIG_DEFAULTS.md)
    cuda_graphs: str = _opt("auto", "capture the training step as a CUDA graph and replay it (GPUs)",
                            ("auto", "on", "off"),
                            doc="replayed for every batch of the same shape (the same training; genres padded with a "
                                "zero vector); needs GPUs, with several processes every table replicated "
                                "(--data-parallel-below-mb, --sharding data_parallel) and --gradient-sync allreduce, "
                                "a constant learning rate (--lr-schedule constant, --warmup-steps 0) and "
                                "--embedding-optimizer rowwise_adagrad or sgd; auto: on where these hold, off "
                                "otherwise")


@dataclass
class TrackingConfig:
    """MLflow tracking and the evaluation cut-off."""

    run_name: Optional[str] = _opt(None, "MLflow run name and default output folder name")
    mlflow_uri: Optional[str] = _opt(None, "MLflow tracking URI (default: sqlite in the output dir; 'none': off)")
    experiment_name: str = _opt("twotower-movielens", "MLflow experiment")
    registered_model_name: Optional[str] = _opt("twotower-movielens", "MLflow registered model name ('' = none)")
    eval_k: int = _opt(10, "cut-off of Recall@k / NDCG@k")


@dataclass
class OutputConfig:
    """What the run writes: run directory, checkpoints, the SageMaker package."""

    output_dir: Optional[str] = _opt(None, "run directory (default ./outputs/<run-name>)")
    checkpoint_dir: Optional[str] = _opt(None, "sharded checkpoints (default OUTPUT/checkpoints)")
    checkpoint_every_n_steps: int = _opt(0, "also checkpoint every N steps (0 = epoch ends only)")
    resume: Optional[str] = _opt(None, "'auto' (latest checkpoint in the checkpoint dir) or a checkpoint path")
    package: bool = _opt(False, "also write OUTPUT/model.tar.gz in the SageMaker layout")
    progress: bool = _opt(True, "show a progress bar")


@dataclass
class TrainConfig:
    """Everything `python -m entrypoints.train` needs; also the SageMaker hyperparameters.

    Option names are the leaf field names (or a field's ``option``), whatever section holds them:
    `--batch-size` sets ``data.batch_size``, and `to_flat_dict` / `from_dict` use the same flat names."""

    seed: int = _opt(0, "global seed (data order, negatives, initialisation)")
    data: DataConfig = _section(DataConfig, "data: input and batches")
    model: ModelConfig = _section(ModelConfig, "model: the towers")
    loss: LossConfig = _section(LossConfig, "loss: the training objective")
    optim: OptimConfig = _section(OptimConfig, "optimisation: optimizers, schedules, epochs")
    distributed: DistributedConfig = _section(DistributedConfig, "distributed: processes, sharding, gradient sync")
    performance: PerformanceConfig = _section(PerformanceConfig, "performance: speed settings (same training)")
    tracking: TrackingConfig = _section(TrackingConfig, "tracking: MLflow and evaluation")
    output: OutputConfig = _section(OutputConfig, "output: run directory, checkpoints, resume")
    # last: its data_dir, output_dir and seed are set by the options of the same name above
    prepare: PrepareConfig = _section(PrepareConfig, "data preparation: when --data-dir is raw or synthetic")
    # old command lines, notebooks and SageMaker hyperparameters keep working or fail with a reason
    RETIRED: ClassVar[Tuple[Retired, ...]] = (
        Retired("train_pipeline", "TorchRec's TrainPipelineSparseDist path is no longer part of training; "
                                  "Lightning's own loop (the old 'off') is the only one", ignored=("off",)),
    )


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

