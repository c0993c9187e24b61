"""Approximate-search indexes built into an exported model directory, so that the server only reads
them (`twotower_lit.export.search`): a faiss index over the item vectors, written with
``faiss.write_index`` (faiss's own binary format, never a pickle) and listed with its sha256 in the
export's manifest like every other model file; ``index.json`` holds each index's kind, faiss factory
string, parameters, size, build time and its recall@10 against exact search, measured on the
validation users (or a sample of the known users) with their seen items excluded, as served.

Kinds (each with fp32, fp16 or int8 item vectors; `index_name` says how the variant is called):

* ``exact``: every item scored; fp16 / int8 store the vectors quantised (a faiss flat index);
  fp32 is the server's torch matrix product and needs no file.
* ``hnsw``: a graph (faiss HNSW, inner product): ``M`` neighbours per node, ``efConstruction``,
  ``efSearch`` (raised at search time to the candidates asked for).
* ``ivf``: inverted lists (faiss IVF; int8 / fp16 scalar-quantised, fp32 flat): ``nlist`` lists
  trained by k-means, ``nprobe`` of them scanned per query.

    build_index(model_dir, "hnsw", {"M": 32}, vector_dtype="int8", users=validation_user_indices)
    python -m entrypoints.index --model-dir MODEL --index hnsw [--param M=32] [--vector-dtype int8]
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from twotower_lit.export.format import ExportedModel, add_to_manifest, load_export, read_manifest
from twotower_lit.export.search import (INDEX_META, KINDS, VECTOR_DTYPES, ExactSearch, FaissSearch, index_name,
                                         read_index_meta)

RECALL_K = 10
_SQ = {"fp32": "Flat", "fp16": "SQfp16", "int8": "SQ8"}


def default_params(kind: str, num_items: int) -> Dict[str, int]:
    """Build parameters, and the search parameter's starting point (`build_index` raises it until the
    recall target is met, unless it is given)."""
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 64}
    if kind == "ivf":
        nlist = 2 ** int(round(math.log2(max(1.0, 4 * math.sqrt(num_items)))))
        nlist = max(1, min(nlist, num_items // 39))  # k-means wants 39+ training points per list
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 64))}
    return {}


# the search-time parameter of each kind, and how far `build_index` may raise it for recall
TUNED = {"hnsw": ("efSearch", lambda params: 2048), "ivf": ("nprobe", lambda params: params["nlist"])}


def _factory(kind: str, vector_dtype: str, params: Dict[str, int]) -> Optional[str]:
    if kind == "exact":
        return None if vector_dtype == "fp32" else _SQ[vector_dtype]
    if kind == "hnsw":
        return f"HNSW{params['M']}" + ("" if vector_dtype == "fp32" else "," + _SQ[vector_dtype])
    return f"IVF{params['nlist']},{_SQ[vector_dtype]}"


def build_faiss_index(item_vectors: torch.Tensor, kind: str, vector_dtype: str = "fp32",
                      params: Optional[Dict[str, int]] = None, seed: int = 0,
                      log: Callable[[str], None] = lambda s: None) -> Tuple[object, Dict]:
    """(faiss index over `item_vectors` [I, d], its index.json entry without file/recall)."""
    import faiss

    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
    if vector_dtype not in VECTOR_DTYPES:
        raise ValueError(f"unknown vector dtype {vector_dtype!r}; use one of {', '.join(VECTOR_DTYPES)}")
    num_items, dim = item_vectors.shape
    merged = default_params(kind, num_items)
    unknown = sorted(set(params or {}) - set(merged))
    if unknown:
        raise ValueError(f"index {kind}: unknown parameter(s) {', '.join(unknown)}; it takes "
                         f"{', '.join(merged) or 'none'}")
    merged.update({k: int(v) for k, v in (params or {}).items()})
    bad = [f"{k}={v}" for k, v in merged.items() if v < 1]
    if kind == "ivf" and merged["nlist"] > num_items:
        bad.append(f"nlist={merged['nlist']} (more lists than the {num_items} items)")
    if bad:
        raise ValueError(f"index {kind}: bad parameter(s) {', '.join(bad)}: each must be a positive integer")
    factory = _factory(kind, vector_dtype, merged)
    vectors = np.ascontiguousarray(item_vectors.float().numpy())
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = merged["efConstruction"]
    if not index.is_trained:  # k-means (and the quantiser's ranges) on a sample: 64 points per list suffice
        rng = np.random.default_rng(seed)
        size = 64 * merged.get("nlist", 1)
        sample = vectors if num_items <= size else vectors[np.sort(rng.choice(num_items, size, replace=False))]
        log(f"training {factory} on {len(sample)} vectors")
        index.train(sample)
    step = max(1, min(num_items, 100_000))
    for lo in range(0, num_items, step):
        index.add(vectors[lo:lo + step])
        if num_items > step:
            log(f"added {min(lo + step, num_items)}/{num_items} items ({time.perf_counter() - t0:.0f} s)")
    entry = {"kind": kind, "vector_dtype": vector_dtype, "factory": factory, "metric": "inner_product",
             "params": merged, "items": int(num_items), "dim": int(dim),
             "build_s": round(time.perf_counter() - t0, 2)}
    return index, entry


def measure_recall(model: ExportedModel, search, users: Sequence[int], k: int = RECALL_K,
                   exclude_seen: bool = True, chunk: int = 256) -> float:
    """Mean over `users` (user indices) of |search's top k ∩ exact top k| / |exact top k|, each
    user's seen items excluded as the server excludes them."""
    exact = ExactSearch(model.item_vectors)
    hits = total = 0
    for lo in range(0, len(users), chunk):
        part = [int(u) for u in users[lo:lo + chunk]]
        vectors = model.user_vectors(model.user_features[part])
        exclude = [model.seen(u) - 1 if exclude_seen else torch.zeros(0, dtype=torch.long) for u in part]
        es, ec = exact.topk(vectors, k, exclude)
        as_, ac = search.topk(vectors, k, exclude)
        for row in range(len(part)):
            want = set(ec[row][torch.isfinite(es[row])].tolist())
            got = set(ac[row][torch.isfinite(as_[row])].tolist())
            hits += len(want & got)
            total += len(want)
    return hits / total if total else 1.0


def build_index(model_dir: str, kind: str = "hnsw", params: Optional[Dict[str, int]] = None,
                vector_dtype: str = "fp32", users: Optional[Sequence[int]] = None, recall_users: int = 2000,
                target_recall: Optional[float] = 0.95, default: bool = True, threads: Optional[int] = None,
                seed: int = 0, log: Callable[[str], None] = print) -> Dict:
    """Add an index to the exported model in `model_dir` and return its index.json entry.

    `users`: user indices (the export's, 1-based) whose recall@10 vs exact is measured, e.g. the
    validation split's users; default: the export's known users. At most `recall_users` of them
    are used (a seeded sample). Unless `params` fixes it, the search parameter (hnsw efSearch, ivf
    nprobe) is doubled from its default until recall@10 reaches `target_recall` (None: never), which
    costs search time only, not a rebuild. The index file and index.json are listed in manifest.json with
    their sha256; `default` makes it the index that ``--search auto`` (the server's default)
    answers with. `threads`: faiss threads while building (default: every core)."""
    import faiss

    name = index_name(kind, vector_dtype)
    model = load_export(model_dir, check=True)
    manifest = read_manifest(model_dir)
    meta = read_index_meta(model_dir, manifest) or {"indexes": {}}
    faiss.omp_set_num_threads(threads or os.cpu_count() or 1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        log(f"building index {name} over {model.num_items} items of {model.item_vectors.shape[1]} dimensions")
        if kind == "exact" and vector_dtype == "fp32":
            entry = {"kind": "exact", "vector_dtype": "fp32", "factory": None, "metric": "inner_product",
                     "params": {}, "items": model.num_items, "dim": int(model.item_vectors.shape[1]), "build_s": 0.0}
            search = ExactSearch(model.item_vectors)
            index = None
        else:
            index, entry = build_faiss_index(model.item_vectors, kind, vector_dtype, params, seed, log)
            search = FaissSearch(index, model.item_vectors, entry)
        pool = np.asarray(sorted(set(int(u) for u in users)) if users is not None else
                          np.arange(1, len(model.user_ids)), dtype=np.int64)
        bad = pool[(pool < 1) | (pool >= len(model.user_ids))]
        if len(bad):
            raise ValueError(f"users: {len(bad)} index(es) outside the export's 1..{len(model.user_ids) - 1}, "
                             f"e.g. {bad[:3].tolist()}; pass user indices of this export")
        if len(pool) > recall_users:
            pool = np.sort(np.random.default_rng(seed).choice(pool, recall_users, replace=False))
        t0 = time.perf_counter()
        entry["recall_at_10"] = round(measure_recall(model, search, pool), 4) if index is not None else 1.0
        if kind in TUNED and target_recall is not None and TUNED[kind][0] not in (params or {}):
            name_, most = TUNED[kind][0], TUNED[kind][1](entry["params"])
            while entry["recall_at_10"] < target_recall and entry["params"][name_] < most:
                entry["params"][name_] = min(most, 2 * entry["params"][name_])
                search = FaissSearch(index, model.item_vectors, entry)
                entry["recall_at_10"] = round(measure_recall(model, search, pool), 4)
                log(f"{name_}={entry['params'][name_]}: recall@{RECALL_K} {entry['recall_at_10']:.4f}")
            entry["target_recall"] = target_recall
        entry["recall_users"] = int(len(pool))
        entry["recall_of"] = "validation users" if users is not None else "known users"
        entry["recall_s"] = round(time.perf_counter() - t0, 2)
    finally:
        torch.set_num_threads(torch_threads)
    written = [INDEX_META]
    if index is not None:
        entry["file"] = f"index-{name}.faiss"
        faiss.write_index(index, os.path.join(model_dir, entry["file"]))
        entry["bytes"] = os.path.getsize(os.path.join(model_dir, entry["file"]))
        written.insert(0, entry["file"])
    else:
        entry["bytes"] = 0
    meta["indexes"][name] = entry
    if default or "default" not in meta:
        meta["default"] = name
    with open(os.path.join(model_dir, INDEX_META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    add_to_manifest(model_dir, written)
    log(f"index {name}: recall@{RECALL_K} {entry['recall_at_10']:.4f} vs exact on {entry['recall_users']} "
        f"{entry['recall_of']}, {entry['bytes'] / 2 ** 20:.1f} MiB, built in {entry['build_s']:.1f} s")
    return entry


def parse_params(specs: Sequence[str]) -> Dict[str, int]:
    """['M=32', 'efSearch=64'] -> {'M': 32, 'efSearch': 64}, naming a malformed one."""
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--param {spec!r}: expected NAME=INTEGER, e.g. M=32 or nprobe=16")
        out[key.strip()] = int(value)
    return out
