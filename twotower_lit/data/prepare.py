"""Raw MovieLens -> prepared Parquet shards + manifest (the contract in ``schema.py``).

Flow: resolve the source (directory, download or synthetic) -> skip if an identical prepare is
already there -> read + validate -> vocabularies -> de-duplicate -> labels (+ neutral drop) ->
split -> shards, users.parquet, items.parquet -> manifest.json, written last.

Vocabulary choice: users = every user with a valid rating or a row in the users file; items =
every item with a valid rating or a row in the movies file. Catalogue items nobody rated get an
embedding row (untrained apart from their side features) so the item vocabulary matches the
catalogue that serving may be asked about; they are counted as ``items_without_ratings``.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from twotower_lit.config import PrepareConfig
from twotower_lit.data import features as F
from twotower_lit.data import schema
from twotower_lit.data.layouts import Layout, detect_layout, layout_for
from twotower_lit.data.readers import read_movies, read_ratings, read_users
from twotower_lit.data.splits import TEST, TRAIN, VAL, random_split, shard_count, shard_rows_order, temporal_split
from twotower_lit.data.storage import Storage, sha256_file
from twotower_lit.data.validation import BadLineReport

# PrepareConfig fields that change the prepared output (the re-run check compares these).
OUTPUT_OPTIONS = ("split", "val_fraction", "test_fraction", "seed", "threshold", "neutral", "on_bad_lines",
                  "shard_rows", "min_shards", "zip_prefix")
NEUTRAL_LOW = 3.0  # ratings in [3, threshold) are "neutral" (--neutral drop removes them)
_LOOKUP_MAX_ID = 1 << 26  # ids below this are indexed with a lookup table, larger ones by sorting

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# public API


def read_manifest(path: str) -> dict:
    """The manifest of a prepared directory (local or s3://); raises FileNotFoundError if none."""
    store = Storage(path)
    if not store.exists(schema.MANIFEST):
        raise FileNotFoundError(f"{store.url(schema.MANIFEST)}: no manifest; run `python -m entrypoints.prepare "
                                f"--data-dir RAW --output-dir {path}` first")
    return json.loads(store.read_bytes(schema.MANIFEST))


def is_prepared(path: str) -> bool:
    """True when ``path`` holds a complete prepared dataset of this schema version."""
    try:
        manifest = read_manifest(path)
    except (FileNotFoundError, OSError, ValueError):
        return False
    return manifest.get("schema_version") == schema.SCHEMA_VERSION and "files" in manifest


def prepare_dataset(cfg: PrepareConfig, output_dir: Optional[str] = None, log: Log = print) -> dict:
    """Prepare the raw data named by ``cfg`` into ``output_dir`` (default ``cfg.output_dir``);
    returns the manifest. A no-op (returning the existing manifest) when the same options were
    already applied to the same input bytes."""
    output_dir = output_dir or cfg.output_dir
    if not output_dir:
        raise ValueError("an output directory is needed (--output-dir DIR or s3://bucket/prefix)")
    started = time.time()
    data_dir, dataset, source = resolve_source(cfg, output_dir, log)
    layout = layout_for(dataset)
    source["files"] = _fingerprint(data_dir, layout)
    options = {name: getattr(cfg, name) for name in OUTPUT_OPTIONS}

    store = Storage(output_dir)
    previous = _existing_manifest(store)
    if previous is not None and _same_run(previous, dataset, options, source, store):
        log(f"prepare: {store.url(schema.MANIFEST)} already holds this dataset with these options "
            "(same input checksums); skipped")
        return previous
    manifest = _build(cfg, data_dir, layout, source, options, store, log)
    store.write_bytes(schema.MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())
    for line in summary_lines(manifest, store.uri, time.time() - started):
        log(line)
    return manifest


def resolve_source(cfg: PrepareConfig, output_dir: str, log: Log = print) -> Tuple[str, str, dict]:
    """(raw data directory, dataset name, source description) of the config's input."""
    given = [name for name, v in (("--synthetic", cfg.synthetic), ("--download", cfg.download),
                                  ("--data-dir", cfg.data_dir)) if v]
    if len(given) > 1:
        raise ValueError(f"choose one input, got {' and '.join(given)}")
    if cfg.sha256 and not cfg.download:
        raise ValueError("--sha256 is the digest of a --download zip; pass it with --download NAME")
    if cfg.synthetic:
        from twotower_lit.data.synthetic import generate_movielens, synthetic_dir
        raw = synthetic_dir(cfg, output_dir)
        spec = generate_movielens(raw, cfg.synthetic, cfg.synthetic_layout, seed=cfg.seed, log=log)
        return raw, cfg.synthetic_layout, {"kind": "synthetic", "data_dir": raw, "synthetic": spec}
    if cfg.download:
        from twotower_lit.data.download import download_dataset
        raw, info = download_dataset(cfg.download, cfg.cache_dir, log=log, sha256=cfg.sha256)
        return raw, cfg.download, {"kind": "download", "data_dir": raw, "download": info}
    if not cfg.data_dir:
        raise ValueError("no input: pass --data-dir RAW_DIR, --download NAME or --synthetic N_RATINGS")
    if cfg.data_dir.startswith("s3://"):
        raise ValueError(f"{cfg.data_dir}: raw input must be a local directory (copy it first, e.g. "
                         "`aws s3 sync`); only the output may be on S3")
    data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir))
    dataset = cfg.dataset or detect_layout(data_dir)
    return data_dir, dataset, {"kind": "directory", "data_dir": data_dir}


def summary_lines(manifest: dict, where: str = "", seconds: Optional[float] = None) -> List[str]:
    """Human summary of a manifest: rows per split, what was skipped or merged and why, time."""
    c = manifest["counts"]
    out = [f"prepared {manifest['dataset']} -> {where}: train {c['train']:,} / val {c['val']:,} / "
           f"test {c['test']:,} rows; {c['users']:,} users, {c['items']:,} items"
           + (f" in {seconds:.1f} s" if seconds is not None else "")]
    out.append(f"  raw lines {c['raw_rows']:,}; duplicates merged {c['duplicates']:,}; "
               f"neutral dropped {c['neutral_dropped']:,}; positive rate " +
               " / ".join(f"{s} {manifest['positive_rate'][s]:.3f}" for s in schema.SPLITS))
    skipped = c["skipped"]
    out.append("  skipped: " + (", ".join(f"{k} {v:,}" for k, v in skipped.items()) if skipped else "none"))
    for key in ("ratings_item_not_in_movies", "ratings_user_not_in_users", "items_without_ratings",
                "users_without_ratings", "users_train_only"):
        if c.get(key):
            out.append(f"  {key.replace('_', ' ')}: {c[key]:,}")
    return out


# ---------------------------------------------------------------------------------------------
# the pipeline


def _build(cfg: PrepareConfig, data_dir: str, layout: Layout, source: dict, options: dict, store: Storage,
           log: Log) -> dict:
    t0 = time.time()
    report = BadLineReport()
    ratings = read_ratings(data_dir, layout, cfg.on_bad_lines, report)
    users_raw = read_users(data_dir, layout, cfg.on_bad_lines, report)
    movies_raw = read_movies(data_dir, layout, cfg.on_bad_lines, report)
    log(f"prepare: read {ratings.lines_read:,} rating lines ({len(ratings):,} valid) from {data_dir} "
        f"in {time.time() - t0:.1f} s")

    user_ids, user = index_ids(ratings.user_id, np.fromiter(users_raw or (), np.int64))
    item_ids, item = index_ids(ratings.item_id, np.fromiter(movies_raw, np.int64))
    n_users, n_items = len(user_ids), len(item_ids)
    counts: Dict[str, Any] = {"raw_rows": ratings.lines_read, "skipped": report.as_dict()}

    keep = latest_per_pair(user, item, ratings.timestamp)
    counts["duplicates"] = int(len(user) - keep.size) if keep is not None else 0
    rating, timestamp = ratings.rating, ratings.timestamp
    if keep is not None:
        user, item, rating, timestamp = user[keep], item[keep], rating[keep], timestamp[keep]
    del ratings

    neutral = (rating >= NEUTRAL_LOW) & (rating < cfg.threshold)
    counts["neutral_dropped"] = int(neutral.sum()) if cfg.neutral == "drop" else 0
    if cfg.neutral == "drop" and counts["neutral_dropped"]:
        live = ~neutral
        user, item, rating, timestamp = user[live], item[live], rating[live], timestamp[live]
    elif cfg.neutral not in ("keep", "drop"):
        raise ValueError(f"neutral must be 'keep' or 'drop', got {cfg.neutral!r}")
    if len(user) == 0:
        raise ValueError(f"{os.path.join(data_dir, layout.ratings_file)}: every rating is neutral "
                         f"({NEUTRAL_LOW:g} <= rating < --threshold {cfg.threshold:g}) and --neutral drop removed "
                         "them all; nothing is left to train on (use --neutral keep or another --threshold)")
    label = (rating >= cfg.threshold).astype(np.float32)

    if cfg.split == "random":
        split = random_split(user, n_users, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    elif cfg.split == "temporal":
        split = temporal_split(user, timestamp, n_users)
    else:
        raise ValueError(f"split must be 'random' or 'temporal', got {cfg.split!r}")
    per_user = np.bincount(user, minlength=n_users + 1)
    counts["users_train_only"] = int(((per_user > 0) & (per_user < 3)).sum())

    rated_items = np.bincount(item, minlength=n_items + 1) > 0
    rated_users = per_user > 0
    counts.update(users=n_users, items=n_items,
                  items_without_ratings=int(n_items - rated_items[1:].sum()),
                  users_without_ratings=int(n_users - rated_users[1:].sum()))
    in_movies = np.isin(item_ids, np.fromiter(movies_raw, np.int64))
    counts["ratings_item_not_in_movies"] = int((~in_movies[item - 1]).sum()) if len(item) else 0
    counts["items_not_in_movies"] = int((~in_movies).sum())
    if users_raw is not None:
        in_users = np.isin(user_ids, np.fromiter(users_raw, np.int64))
        counts["ratings_user_not_in_users"] = int((~in_users[user - 1]).sum()) if len(user) else 0
        counts["users_not_in_users_file"] = int((~in_users).sum())

    vocab, users_table, items_table = build_side_tables(user_ids, item_ids, users_raw, movies_raw, cfg.zip_prefix)

    # Everything is read and validated: only now is the old output replaced. The old manifest
    # goes first, so a crash from here on leaves no manifest claiming completeness.
    store.delete(schema.MANIFEST)
    for name in schema.SPLITS:
        store.delete_dir(name)  # old shards of another shard count must not linger
    columns = {"user": user.astype(np.int32), "item": item.astype(np.int32), "rating": rating.astype(np.float32),
               "label": label, "timestamp": timestamp.astype(np.int64)}
    files: Dict[str, dict] = {}
    positive_rate: Dict[str, float] = {}
    jobs = []
    with cf.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for split_index, (name, code) in enumerate(zip(schema.SPLITS, (TRAIN, VAL, TEST))):
            rows = np.flatnonzero(split == code)
            counts[name] = int(rows.size)
            positive_rate[name] = round(float(label[rows].mean()), 6) if rows.size else 0.0
            n_shards = shard_count(rows.size, cfg.shard_rows, cfg.min_shards)
            for k, part in enumerate(shard_rows_order(rows.size, n_shards, cfg.seed, split_index)):
                take = rows[part]
                table = pa.table({c: columns[c][take] for c in schema.RATING_COLUMNS},
                                 schema=_ratings_schema())
                rel = f"{name}/part-{k:05d}.parquet"
                jobs.append((rel, pool.submit(store.write_parquet, rel, table)))
        jobs.append((schema.USERS_FILE, pool.submit(store.write_parquet, schema.USERS_FILE, users_table)))
        jobs.append((schema.ITEMS_FILE, pool.submit(store.write_parquet, schema.ITEMS_FILE, items_table)))
        for rel, job in jobs:
            files[rel] = job.result()
    log(f"prepare: wrote {len(files)} Parquet files ({sum(f['bytes'] for f in files.values()) / 1e6:,.1f} MB) "
        f"to {store.uri}")

    user_features = ["user"] + [n for n in schema.USER_SIDE_FEATURES if n in vocab]
    item_features = ["item"] + [n for n in schema.ITEM_SIDE_FEATURES if n in vocab]
    vocab_sizes = {"user": n_users + 1, "item": n_items + 1}
    vocab_sizes.update({name: len(values) + 1 for name, values in vocab.items()})
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "dataset": layout.name,
        "source": source,
        "options": options,
        "counts": counts,
        "positive_rate": positive_rate,
        "vocab_sizes": vocab_sizes,
        "vocab": vocab,
        "user_features": user_features,
        "item_features": item_features,
        "examples_skipped": report.examples,
        "files": files,
    }


def _ratings_schema() -> pa.Schema:
    return pa.schema([(name, getattr(pa, typ)()) for name, typ in schema.RATING_COLUMNS.items()])


def index_ids(ids: np.ndarray, extra: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted distinct raw ids of ``ids`` and ``extra``, 1-based index of each entry of ``ids``)."""
    every = np.concatenate([ids, extra]) if extra.size else ids
    if every.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    top = int(every.max())
    if top < _LOOKUP_MAX_ID:  # O(n): a presence table instead of a 32M-row sort
        present = np.zeros(top + 1, bool)
        present[every] = True
        vocab = np.flatnonzero(present).astype(np.int64)
        table = np.zeros(top + 1, np.int32)
        table[vocab] = np.arange(1, vocab.size + 1, dtype=np.int32)
        return vocab, table[ids]
    vocab = np.unique(every)
    return vocab, (np.searchsorted(vocab, ids) + 1).astype(np.int32)


def latest_per_pair(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray) -> Optional[np.ndarray]:
    """Rows to keep so each (user, item) appears once: the latest by timestamp, ties -> the later
    row. None when there are no duplicates (the common case, found with one sort)."""
    n = int(user.shape[0])
    if n < 2:
        return None
    n_items = int(item.max()) + 1
    pair = user.astype(np.int64) * n_items + item
    row_bits = max(1, (n - 1).bit_length())
    if (int(pair.max()).bit_length() + row_bits) <= 63:
        key = np.sort((pair << row_bits) | np.arange(n, dtype=np.int64))
        order, sorted_pair = key & ((1 << row_bits) - 1), key >> row_bits
        del key
    else:
        order = np.lexsort((np.arange(n), pair))
        sorted_pair = pair[order]
    same = sorted_pair[1:] == sorted_pair[:-1]
    if not same.any():
        return None
    member = np.zeros(n, bool)
    member[1:] |= same
    member[:-1] |= same
    rows = order[member]  # only the duplicated pairs are ordered by time
    rows = rows[np.lexsort((rows, timestamp[rows], pair[rows]))]
    losers = rows[:-1][pair[rows[1:]] == pair[rows[:-1]]]
    keep = np.ones(n, bool)
    keep[losers] = False
    return np.flatnonzero(keep)


def _sort_key(value: Any):
    # Occupation codes '0'..'20' in numeric order, names alphabetically.
    text = str(value)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def build_side_tables(user_ids: np.ndarray, item_ids: np.ndarray, users_raw: Optional[Dict[int, dict]],
                      movies_raw: Dict[int, dict], zip_chars: int) -> Tuple[dict, pa.Table, pa.Table]:
    """(vocabularies, users table, items table) for the given id vocabularies."""
    vocab: Dict[str, list] = {}
    users_cols: Dict[str, Any] = {"user": pa.array(np.arange(1, len(user_ids) + 1, dtype=np.int32)),
                                  "user_id": pa.array(user_ids, pa.int64())}
    if users_raw is not None:
        rows = list(users_raw.values())
        vocab["gender"] = F.build_vocab(F.normalise_gender(r["gender"]) for r in rows)
        vocab["age"] = list(F.AGE_GROUPS)  # fixed, so an age index means the same in every set
        vocab["occupation"] = sorted(F.build_vocab(F.normalise_occupation(r["occupation"]) for r in rows),
                                     key=_sort_key)
        vocab["zip"] = F.build_vocab(F.zip_prefix(r["zip"], zip_chars) for r in rows)
        encode = F.UserFeatureEncoder(vocab, zip_chars)
        raw_rows = [users_raw.get(int(u), {}) for u in user_ids]
        for name in encode.features:
            # the serving encoder, called once per distinct raw value rather than once per user
            values = [r.get(name) for r in raw_rows]
            index = {v: encode({name: v})[name] for v in set(values)}
            users_cols[name] = pa.array(np.fromiter((index[v] for v in values), np.int32, len(values)))

    vocab["genres"] = F.build_vocab(g for m in movies_raw.values() for g in m["genres"])
    vocab["year"] = F.build_vocab((m["year"] for m in movies_raw.values()), empty=0)
    genre_index, year_index = F.vocab_index(vocab["genres"]), F.vocab_index(vocab["year"])
    titles, years, offsets, values = [], [], [0], []
    for mid in item_ids:
        movie = movies_raw.get(int(mid))
        if movie is None:
            titles.append("")
            years.append(0)
        else:
            titles.append(movie["title"])
            years.append(year_index.get(movie["year"], 0))
            values.extend(genre_index[g] for g in movie["genres"])
        offsets.append(len(values))
    genres = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
    items = pa.table({"item": pa.array(np.arange(1, len(item_ids) + 1, dtype=np.int32)),
                      "item_id": pa.array(item_ids, pa.int64()), "title": pa.array(titles, pa.string()),
                      "genres": genres.cast(pa.list_(pa.field("element", pa.int32()))),
                      "year": pa.array(years, pa.int32())})
    return vocab, pa.table(users_cols), items


# ---------------------------------------------------------------------------------------------
# re-run detection


def _fingerprint(data_dir: str, layout: Layout) -> Dict[str, dict]:
    """size + sha256 of each input file the layout reads."""
    out = {}
    names = [layout.ratings_file, layout.users_file, layout.movies_file]
    if layout.name == "ml-100k":
        names.append("u.genre")
    for name in names:
        if name and os.path.isfile(os.path.join(data_dir, name)):
            path = os.path.join(data_dir, name)
            out[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    return out


def _existing_manifest(store: Storage) -> Optional[dict]:
    try:
        return json.loads(store.read_bytes(schema.MANIFEST)) if store.exists(schema.MANIFEST) else None
    except (OSError, ValueError):
        return None


def _same_run(previous: dict, dataset: str, options: dict, source: dict, store: Storage) -> bool:
    if (previous.get("schema_version") != schema.SCHEMA_VERSION or previous.get("dataset") != dataset
            or previous.get("options") != options
            or previous.get("source", {}).get("files") != source["files"]
            or previous.get("source", {}).get("synthetic") != source.get("synthetic")):
        return False
    # every file the manifest lists must still be there with its size
    return all(store.size(rel) == meta.get("bytes") for rel, meta in previous.get("files", {}).items())
