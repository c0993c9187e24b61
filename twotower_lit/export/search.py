"""Top-k item search for a batch of user vectors: exact (torch) or a faiss index built at export
(`twotower_lit.export.index` writes it; this module reads it back, checksummed, and searches it).

Every search answers ``topk(user_vectors [B, d], k, exclude) -> (scores [B, k], columns [B, k])``,
best first, with the excluded columns (a user's seen items) never among them; a row with fewer than
k answers is padded with score -inf. The scores are always the model's exact inner products (in
float64, the same whatever the batch: `rescore`): an approximate index only chooses the
candidates, which are then scored with the item vectors.

Only torch and numpy are imported here; faiss only when an index is opened.
"""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from twotower_lit.export.format import ArtifactError, ExportedModel, _verified_bytes, read_manifest

INDEX_META = "index.json"  # the indexes of an export: kind, faiss factory, parameters, recall, file
KINDS = ("exact", "hnsw", "ivf")  # index kinds; each with fp32, fp16 or int8 item vectors
VECTOR_DTYPES = ("fp32", "fp16", "int8")


def index_name(kind: str, vector_dtype: str = "fp32") -> str:
    """An index's name in the export and for --search: the kind, with the vector type unless fp32."""
    return kind if vector_dtype == "fp32" else f"{kind}-{vector_dtype}"


# what --search accepts: auto (the export's default index, else exact), faiss (the export's default
# faiss index, else an HNSW index built at load), or an index by name
SEARCHES = ("auto", "faiss") + tuple(index_name(k, t) for k in KINDS for t in VECTOR_DTYPES)
# faiss parameters set at search time (the others are fixed when the index is built)
SEARCH_PARAMS = ("efSearch", "nprobe")
_SCORE_BYTES = 64 << 20  # bounds the [users, items] score matrix of exact search


class Counters:
    """What a search did since the server started, for /ping and the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queries = 0
        self.filtered = 0  # seen items removed from an approximate index's candidates
        self.fallbacks = 0  # queries answered by exact search: too few unseen candidates came back

    def add(self, queries: int, filtered: int = 0, fallbacks: int = 0) -> None:
        with self._lock:
            self.queries += queries
            self.filtered += filtered
            self.fallbacks += fallbacks


def rescore(user_vectors: torch.Tensor, item_vectors: torch.Tensor, scores: torch.Tensor,
            cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chosen items' scores again, in float64, one user at a time in effect (an elementwise
    product summed per row): a matrix product's rounding depends on how many users it holds, these
    scores do not, so a request gets the same scores and order in any batch. Rows stay best first;
    -inf (padding, excluded) stays -inf."""
    exact = (item_vectors[cols].double() * user_vectors.double().unsqueeze(1)).sum(-1)
    exact[scores == -math.inf] = -math.inf
    order = torch.sort(exact, dim=1, descending=True, stable=True).indices
    return torch.gather(exact, 1, order), torch.gather(cols, 1, order)


def mask_columns(scores: torch.Tensor, exclude: Sequence[torch.Tensor]) -> None:
    """Set each row's excluded columns to -inf, in place."""
    lengths = torch.tensor([len(e) for e in exclude], dtype=torch.long)
    if int(lengths.sum()) == 0:
        return
    rows = torch.repeat_interleave(torch.arange(len(exclude)), lengths)
    scores[rows, torch.cat(list(exclude))] = -math.inf


class ExactSearch:
    """Exact maximum inner product: every item scored (one matrix product per chunk of users), torch.topk."""

    name = "exact"

    def __init__(self, item_vectors: torch.Tensor) -> None:
        self.item_vectors = item_vectors
        self.item_t = item_vectors.t().contiguous()
        self.rows_per_chunk = max(1, _SCORE_BYTES // (4 * max(1, item_vectors.shape[0])))
        self.counters = Counters()
        self.meta: Dict = {"kind": "exact", "vector_dtype": "fp32", "recall_at_10": 1.0}

    def topk(self, user_vectors: torch.Tensor, k: int,
             exclude: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.item_t.shape[1])
        parts = []
        for lo in range(0, user_vectors.shape[0], self.rows_per_chunk):
            scores = user_vectors[lo:lo + self.rows_per_chunk] @ self.item_t
            mask_columns(scores, exclude[lo:lo + self.rows_per_chunk])
            parts.append(torch.topk(scores, k=k, dim=1))
        self.counters.add(user_vectors.shape[0])
        return rescore(user_vectors, self.item_vectors, torch.cat([p.values for p in parts]),
                       torch.cat([p.indices for p in parts]))

    def describe(self) -> Dict:
        return {**self.meta, "queries": self.counters.queries}


class FaissSearch:
    """A faiss inner-product index chooses ``k + len(exclude)`` candidates per user (enough that k
    unseen ones remain once the seen ones are filtered out); the candidates are rescored with the
    exact item vectors. A user for whom the index returns too few unseen candidates (an IVF list
    scan can come back short) is answered by exact search instead, and counted."""

    name = "faiss"

    def __init__(self, index, item_vectors: torch.Tensor, meta: Dict) -> None:
        import faiss

        self.faiss = faiss
        self.index = index
        self.item_vectors = item_vectors
        self.num_items = int(item_vectors.shape[0])
        self.meta = meta
        self.params = {p: int(v) for p, v in meta.get("params", {}).items() if p in SEARCH_PARAMS}
        self.space = faiss.ParameterSpace()
        for p, v in self.params.items():
            self.space.set_index_parameter(index, p, v)
        self.exact: Optional[ExactSearch] = None  # for users the index answers short; built when first needed
        self.counters = Counters()
        self.faiss.omp_set_num_threads(max(1, torch.get_num_threads()))

    def topk(self, user_vectors: torch.Tensor, k: int,
             exclude: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = user_vectors.shape[0]
        k = min(k, self.num_items)
        fetch = min(self.num_items, k + max((len(e) for e in exclude), default=0))
        if "efSearch" in self.params:  # HNSW returns at most efSearch neighbours
            self.space.set_index_parameter(self.index, "efSearch", max(self.params["efSearch"], fetch))
        _, found = self.index.search(np.ascontiguousarray(user_vectors.float().numpy()), fetch)
        cols = torch.from_numpy(found).long()
        missing = cols < 0  # faiss pads with -1 when it finds fewer than asked
        cols = cols.clamp(min=0)
        scores = (self.item_vectors[cols] * user_vectors.float().unsqueeze(1)).sum(-1)
        scores[missing] = -math.inf
        filtered = 0
        for row, ex in enumerate(exclude):
            if len(ex):
                hit = torch.isin(cols[row], ex) & ~missing[row]
                filtered += int(hit.sum())
                scores[row, hit] = -math.inf
        best = torch.topk(scores, k=min(k, fetch), dim=1)
        scores, cols = rescore(user_vectors, self.item_vectors, best.values, torch.gather(cols, 1, best.indices))
        # a row must hold min(k, unseen items) answers, as exact search would give
        wanted = torch.tensor([min(k, self.num_items - len(e)) for e in exclude])
        short = torch.nonzero(torch.isfinite(scores).sum(1) < wanted).flatten().tolist()
        if short:
            self.exact = self.exact or ExactSearch(self.item_vectors)
            s, c = self.exact.topk(user_vectors[short], k, [exclude[i] for i in short])
            scores[short, :s.shape[1]], cols[short, :c.shape[1]] = s, c
        self.counters.add(rows, filtered, len(short))
        return scores, cols

    def describe(self) -> Dict:
        c = self.counters
        return {**self.meta, "queries": c.queries, "seen_filtered": c.filtered, "exact_fallbacks": c.fallbacks}


# the export's indexes -------------------------------------------------------------------------

def read_index_meta(model_dir: str, manifest: Optional[Dict] = None) -> Optional[Dict]:
    """The export's index.json (checked against the manifest), or None when it lists no index."""
    manifest = manifest or read_manifest(model_dir)
    if INDEX_META not in manifest["files"]:
        return None
    data = _verified_bytes(model_dir, INDEX_META, manifest)
    try:
        meta = json.loads(data.decode("utf-8"))
        if not isinstance(meta.get("indexes"), dict):
            raise ValueError("no 'indexes' object")
        return meta
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ArtifactError(f"{os.path.join(model_dir, INDEX_META)}: not an index list ({e}); build the index "
                            f"again: python -m entrypoints.index --model-dir {model_dir}") from None


def open_search(kind: str, model: ExportedModel, model_dir: Optional[str] = None):
    """The search `kind` (see `SEARCHES`) over `model`:

    * ``exact``: torch over the fp32 item vectors;
    * ``hnsw``, ``ivf``, ``exact-int8``, ...: that index of the export, read from its checksummed file;
    * ``auto``: the export's default index when it has one, else exact;
    * ``faiss``: the export's default faiss index; an export without one gets an HNSW index
      built now, in memory (slow for large catalogues: build it at export instead)."""
    if kind not in SEARCHES:
        raise ValueError(f"unknown search {kind!r}; use one of {', '.join(SEARCHES)}")
    if kind == "exact":
        return ExactSearch(model.item_vectors)
    manifest = read_manifest(model_dir) if model_dir else None
    meta = read_index_meta(model_dir, manifest) if model_dir else None
    indexes = (meta or {}).get("indexes", {})
    if kind in ("auto", "faiss"):
        name = (meta or {}).get("default")
        if kind == "faiss" and (name is None or indexes[name]["kind"] == "exact"):
            name = next((n for n, m in indexes.items() if m["kind"] != "exact"), None)
        if name is None:
            if kind == "auto":
                return ExactSearch(model.item_vectors)
            from twotower_lit.export.index import build_faiss_index

            index, entry = build_faiss_index(model.item_vectors, "hnsw")
            return FaissSearch(index, model.item_vectors, dict(entry, built="at load"))
    else:
        name = kind
    if name not in indexes:
        where = model_dir or "this model"
        raise ArtifactError(f"{where}: the export has no {name!r} index (it has: {', '.join(indexes) or 'none'}); "
                            f"build one with python -m entrypoints.index --model-dir {where} --index {name}, "
                            f"or serve with --search exact")
    entry = dict(indexes[name], name=name)
    if entry["kind"] == "exact" and not entry.get("file"):
        return ExactSearch(model.item_vectors)
    import faiss

    data = _verified_bytes(model_dir, entry["file"], manifest)  # checked before faiss parses a byte
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise ArtifactError(f"{os.path.join(model_dir, entry['file'])}: faiss cannot read it ({e}); build the "
                            f"index again") from None
    del data
    if index.ntotal != model.num_items or index.d != model.item_vectors.shape[1]:
        raise ArtifactError(f"{os.path.join(model_dir, entry['file'])}: {index.ntotal} vectors of {index.d} "
                            f"dimensions, the model has {model.num_items} of {model.item_vectors.shape[1]}; "
                            f"build the index again for this export")
    return FaissSearch(index, model.item_vectors, entry)
