"""Where each embedding table lives: the kind of sharding per table, and TorchRec's plan for it."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType

SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "table_row_wise": ShardingType.TABLE_ROW_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}
REPLICATED = "data_parallel"


def table_name(feature: str) -> str:
    """The embedding table of a feature (one table per feature: `twotower_lit.model.TwoTower`)."""
    return f"t_{feature}"


class EmbeddingBagCollectionShardingOffer(EmbeddingBagCollectionSharder):
    """The stock sharder offers row-wise sharding only on CUDA; its CPU kernel handles it too."""

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


def table_kinds(tables: Mapping[str, int], dim: int, sharding: str, overrides: Mapping[str, str],
                replicate_below_mb: float = 0.0, resumed_replicated: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The sharding kind of every table, by feature: its `overrides` entry (--table-sharding), else
    data_parallel for the tables a resumed checkpoint replicated (`resumed_replicated`, table names:
    their embedding optimizer state has another form than a sharded table's, so a resumed run keeps
    the placement), or else, with `replicate_below_mb` > 0, for tables of at most that many MB of
    float32 weights (rows x `dim`), else `sharding` ('auto': the planner's choice, never
    data_parallel). A replicated table needs no all-to-all; each step all-reduces its whole gradient."""
    if sharding != "auto" and sharding not in SHARDING_TYPES:
        raise ValueError(f"--sharding {sharding!r}: choose auto or one of {', '.join(SHARDING_TYPES)}")
    unknown = sorted(set(overrides) - set(tables))
    if unknown:
        raise ValueError(f"--table-sharding names unknown feature(s) {unknown}; features: {sorted(tables)}")
    kinds = {}
    for feature, rows in tables.items():
        if feature in overrides:
            kinds[feature] = overrides[feature]
        elif resumed_replicated is not None:
            kinds[feature] = REPLICATED if table_name(feature) in resumed_replicated else sharding
        elif replicate_below_mb > 0 and rows * dim * 4 <= replicate_below_mb * 2**20:
            kinds[feature] = REPLICATED
        else:
            kinds[feature] = sharding
    return kinds


def graph_refusal(world: int, kinds: Mapping[str, str]) -> Optional[str]:
    """Why a job of `world` processes with these table kinds cannot capture its training steps as
    CUDA graphs (None when it can): with several processes every table must be replicated. A
    sharded table's all-to-all reads the split sizes of the exchanged ids on the host at every step
    (TorchRec's KJT all-to-all), which a capture refuses; replicated tables exchange nothing but the
    all-reduce of their gradients, which NCCL captures."""
    if world == 1:
        return None
    sharded = sorted(table_name(f) for f, kind in kinds.items() if kind != REPLICATED)
    if not sharded:
        return None
    return (f"with several processes every table must be replicated, but {', '.join(sharded)} "
            f"{'is' if len(sharded) == 1 else 'are'} sharded, and the ids' all-to-all of a sharded table reads its "
            f"sizes on the host at every step, which a capture refuses: pass --sharding data_parallel, or a "
            f"--data-parallel-below-mb above the tables' size")


def build_sharding_plan(module: torch.nn.Module, pg: dist.ProcessGroup, device_type: str, kinds: Mapping[str, str],
                        default: str = "auto", local_world_size: Optional[int] = None) -> ShardingPlan:
    """TorchRec planner's plan for `module` with each table's kind by feature (`table_kinds`; a
    feature left out gets `default`; collective: every rank calls it). Sharded tables use the fused
    kernel, so the embedding optimizer runs inside the backward pass; data_parallel tables the
    dense kernel, their optimizer a plain one."""
    sharder = EmbeddingBagCollectionShardingOffer()
    offered = sharder.sharding_types(device_type)
    constraints = {}
    for cfg in embedding_collection(module).embedding_bag_configs():
        kind = kinds.get(cfg.feature_names[0], default)
        if kind != "auto" and kind not in SHARDING_TYPES:
            raise ValueError(f"unknown sharding {kind!r}; choose auto or one of {', '.join(SHARDING_TYPES)}")
        types = [t for t in offered if t != ShardingType.DATA_PARALLEL.value] if kind == "auto" \
            else [SHARDING_TYPES[kind]]
        kernel = EmbeddingComputeKernel.DENSE if kind == REPLICATED else EmbeddingComputeKernel.FUSED
        constraints[cfg.name] = ParameterConstraints(sharding_types=types, compute_kernels=[kernel.value])
    world = pg.size()
    topology = Topology(world_size=world, local_world_size=local_world_size or world, compute_device=device_type)
    return EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(module, [sharder], pg)


def describe_plan(plan: ShardingPlan) -> Dict[str, Dict[str, Any]]:
    """{table: {sharding_type, compute_kernel, ranks}} of a plan (printed and logged to MLflow)."""
    out = {}
    for _, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            out[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                          "ranks": list(ps.ranks or [])}
    return out


def embedding_collection(module: torch.nn.Module):
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    for sub in module.modules():
        if isinstance(sub, EmbeddingBagCollection):
            return sub
    raise ValueError("the model has no EmbeddingBagCollection to shard")
