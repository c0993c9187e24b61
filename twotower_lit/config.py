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

    embedding_dim: int = _opt(32, "dimension of every embedding table")
    user_layers: List[int] = _opt([128, 64], "user tower MLP widths; the last is the output dimension")
    item_layers: List[int] = _opt([128, 64], "item tower MLP widths; the last must equal the user tower's")
    side_features: bool = _opt(True, "use side features (gender, age, occupation, zip; genres, year) where present")


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
    max_epochs: int = _opt(5, "training epochs")
    batch_size: int = _opt(1024, "rated rows per batch per rank (negatives come on top)")
    eval_batch_size: int = _opt(8192, "rows per validation/test batch")
    seed: int = _opt(0, "global seed (data order, negatives, initialisation)")
    negatives: int = _opt(4, "per rated row, this many unrated items labelled 0, drawn afresh each epoch")
    negative_sampling: str = _opt("uniform", "how negatives are drawn", ("uniform", "popularity"))
    accelerator: str = _opt("auto", "cpu, gpu or auto")
    devices: int = _opt(1, "processes (CPU) or GPUs per node")
    num_nodes: int = _opt(1, "nodes")
    num_workers: int = _opt(0, "data-loader worker processes per rank")
    sharding: str = _opt("auto", "embedding sharding", ("auto", "table_wise", "row_wise", "column_wise",
                                                         "table_row_wise", "data_parallel"))
    eval_k: int = _opt(10, "cut-off of Recall@k / NDCG@k")
    mlflow_uri: Optional[str] = _opt(None, "MLflow tracking URI (default: sqlite database in the output dir)")
    experiment_name: str = _opt("twotower-movielens", "MLflow experiment")
    registered_model_name: Optional[str] = _opt("twotower-movielens", "MLflow registered model name ('' = none)")
    checkpoint_dir: Optional[str] = _opt(None, "sharded checkpoints (default OUTPUT/checkpoints)")
    checkpoint_every_n_steps: int = _opt(0, "also checkpoint every N steps (0 = epoch ends only)")
    resume: Optional[str] = _opt(None, "'auto' (latest checkpoint in the checkpoint dir) or a checkpoint path")
    package: bool = _opt(False, "also write OUTPUT/model.tar.gz in the SageMaker layout")
    progress: bool = _opt(True, "show a progress bar")
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


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
        kw: Dict[str, Any] = dict(dest=path[-1], default=argparse.SUPPRESS,
                                  help=f"{f.metadata.get('help', '')} (default: {default})")
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
