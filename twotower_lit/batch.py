"""Offline recommendations: top-k for every user of an exported model (or for listed users),
written as Parquet, locally or to ``s3://`` (`python -m entrypoints.recommend`).

The scoring is the endpoint's own: `twotower_lit.serving.recommender.Recommender` over the export
(torch and safetensors only), the same known-user, cold-start and popularity paths and the same
exclusion of the items a user rated in training. Users go through it in chunks of
``batch_users``, each chunk written as one Parquet row group before the next is scored, so memory
is bounded by the chunk (the recommender scores a bounded block of users against the catalogue at a
time), not by users x items.

Output columns: ``user_id, rank (1 = best), item_id, score, title, source`` (``source``: model,
cold_start or popularity; a popularity row's score is the item's training positives, not a
model score).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from twotower_lit.config import ServeConfig
from twotower_lit.options import opt as _opt
from twotower_lit.export.format import load_export
from twotower_lit.serving.errors import RequestError
from twotower_lit.serving.recommender import Recommender
from twotower_lit.serving.request import JSON, RecommendRequest, UserQuery, parse_request
from twotower_lit.export.search import SEARCHES

SCHEMA = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("item_id", pa.int64()),
                    ("score", pa.float32()), ("title", pa.string()), ("source", pa.dictionary(pa.int8(), pa.string()))])
SOURCES = ["model", "cold_start", "popularity"]  # Recommendation.source values


@dataclass
class RecommendConfig:
    """Batch recommendations from an exported model (`entrypoints.recommend`)."""

    model_dir: Optional[str] = _opt(None, "exported model directory (OUTPUT/model of a training run)")
    output: Optional[str] = _opt(None, "Parquet file to write: a local path or s3://bucket/key.parquet")
    users: str = _opt("all", "all: every user the model knows; or a file: one raw user id per line, or one JSON "
                             "object per line as the endpoint takes it ({\"user_id\": 7}, {\"user_id\": 99999, "
                             "\"user_features\": {\"gender\": \"F\", \"age\": 25, ...}} for a cold start)")
    k: int = _opt(100, "items per user")
    exclude_seen: bool = _opt(True, "leave out the items each user rated in training")
    search: str = _opt("exact", "top-k search, as the endpoint's --search: exact; auto (the export's default index, "
                                "else exact); faiss; or an index of the export by name (python -m entrypoints.index "
                                "builds one)", SEARCHES)
    batch_users: int = _opt(4096, "users scored and written per chunk (one Parquet row group each)")
    device: str = _opt("cpu", "where the scoring runs", ("cpu", "cuda"))
    threads: int = _opt(0, "torch compute threads (0: torch's default, every core)")
    progress: bool = _opt(True, "show a progress bar")


def read_users(path: str) -> List[UserQuery]:
    """The users of a users file: a raw id per line, or a JSON object per line in the endpoint's
    request format (each line must carry a ``user_id``: it names the rows written for it). Blank
    lines and ``#`` comments are skipped; any other bad line is an error naming it."""
    cfg = ServeConfig()
    users: List[UserQuery] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{n}"
            if text.startswith("{"):
                try:
                    request = parse_request(text, JSON, cfg)
                except RequestError as e:
                    raise ValueError(f"{where}: {e}") from None
                if len(request.users) != 1:
                    raise ValueError(f"{where}: one user per line ({{\"user_id\": ..., \"user_features\": ...}}), "
                                     f"not an 'inputs' list")
                query = request.users[0]
            else:
                try:
                    query = UserQuery(user_id=int(text))
                except ValueError:
                    raise ValueError(f"{where}: expected a raw user id or a JSON object, got {text[:60]!r}") from None
            if query.user_id is None:
                raise ValueError(f"{where}: no user_id; a cold-start line needs one to name its rows "
                                 f"(an id the model does not know, with user_features)")
            users.append(query)
    if not users:
        raise ValueError(f"{path}: no users in the file")
    return users


def _chunks(users: Sequence[UserQuery], size: int) -> Iterator[Sequence[UserQuery]]:
    for lo in range(0, len(users), size):
        yield users[lo:lo + size]


def _to_device(model, device: str):
    """The export's scoring tensors on `device` (the seen-item CSR and popularity stay on the host:
    the recommender indexes with them there)."""
    import torch

    if device == "cpu":
        return model
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible; use --device cpu")
    model.user_tower.to(device)
    model.user_features = model.user_features.to(device)
    model.item_vectors = model.item_vectors.to(device)
    return model


def chunk_table(recs, titles: Sequence[str], item_ids: Sequence[int]) -> pa.Table:
    """One Parquet row group: the ranked items of a chunk of users, best first."""
    user_col, rank_col, item_col, score_col, title_col, source_col = [], [], [], [], [], []
    for rec in recs:
        n = len(rec.columns)
        user_col += [rec.user_id] * n
        rank_col += range(1, n + 1)
        item_col += [item_ids[c] for c in rec.columns]
        score_col += rec.scores
        title_col += [titles[c] for c in rec.columns]
        source_col += [rec.source] * n
    sources = pa.DictionaryArray.from_arrays(pa.array([SOURCES.index(s) for s in source_col], pa.int8()),
                                             pa.array(SOURCES, pa.string()))
    # (Table.from_arrays: pa.table() of a dict would import pandas to check for a DataFrame)
    return pa.Table.from_arrays([pa.array(user_col, pa.int64()), pa.array(rank_col, pa.int32()),
                                 pa.array(item_col, pa.int64()), pa.array(score_col, pa.float32()),
                                 pa.array(title_col, pa.string()), sources], schema=SCHEMA)


def recommend(cfg: RecommendConfig) -> dict:
    """Write the Parquet file; returns a summary (users by source, rows, seconds, users/s)."""
    import torch

    from twotower_lit.data.storage import PARQUET_OPTIONS, resolve

    if not cfg.model_dir or not cfg.output:
        raise ValueError("give --model-dir (an exported model directory) and --output (a .parquet path or s3:// URI)")
    if cfg.k < 1 or cfg.batch_users < 1:
        raise ValueError("--k and --batch-users must be at least 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    model = _to_device(load_export(cfg.model_dir, check=True), cfg.device)
    recommender = Recommender(model, search=cfg.search, model_dir=cfg.model_dir)  # an index is read from its folder
    users = ([UserQuery(user_id=uid) for uid in model.user_ids[1:]] if cfg.users == "all"
             else read_users(cfg.users))
    titles = [item.get("title") for item in model.items]
    item_ids = [item["id"] for item in model.items]
    load_seconds = time.perf_counter() - t0

    fs, path = resolve(cfg.output)
    local = not cfg.output.startswith("s3://")
    if local:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # a local file appears whole or not at all; S3 publishes an object only when its upload completes
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else path
    counts = {"model": 0, "cold_start": 0, "popularity": 0}
    rows = 0
    t1 = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(users), unit="user", desc="recommend", smoothing=0.1)
    metadata = {b"twotower": json.dumps({"model_version": model.model_version, "k": cfg.k,
                                         "exclude_seen": cfg.exclude_seen, "search": cfg.search}).encode()}
    try:
        with pq.ParquetWriter(target, SCHEMA.with_metadata(metadata), filesystem=fs, **PARQUET_OPTIONS) as writer:
            for chunk in _chunks(users, cfg.batch_users):
                recs = recommender.recommend(RecommendRequest(users=tuple(chunk), k=cfg.k,
                                                              exclude_seen=cfg.exclude_seen))
                for rec in recs:
                    counts[rec.source] += 1
                table = chunk_table(recs, titles, item_ids)
                writer.write_table(table)
                rows += table.num_rows
                if bar is not None:
                    bar.update(len(chunk))
        if local:
            os.replace(target, path)
    finally:
        if bar is not None:
            bar.close()
        if local and os.path.exists(target):
            os.remove(target)
    seconds = time.perf_counter() - t1
    return {"output": cfg.output, "model_version": model.model_version, "users": len(users), "rows": rows,
            "by_source": counts, "k": cfg.k, "search": cfg.search, "device": cfg.device,
            "load_seconds": round(load_seconds, 2), "seconds": round(seconds, 2),
            "users_per_s": round(len(users) / max(seconds, 1e-9), 1)}


def read_recommendations(path: str) -> Tuple[pa.Table, dict]:
    """The table and the run's metadata (model version, k, search) of a file `recommend` wrote."""
    from twotower_lit.data.storage import resolve

    fs, inner = resolve(path)
    table = pq.read_table(inner, filesystem=fs)
    meta = json.loads((table.schema.metadata or {}).get(b"twotower", b"{}"))
    return table, meta
