"""The prepared-dataset contract shared by `prepare` (writer) and the loaders (readers).

A prepared directory (local or ``s3://``) holds::

    manifest.json                  what is here and how it was made (see below)
    users.parquet                  one row per user index 1..U (index 0 = out of vocabulary)
    items.parquet                  one row per item index 1..I (index 0 = out of vocabulary)
    train/part-00000.parquet ...   rating shards of each split
    val/part-*.parquet
    test/part-*.parquet

Rating shards have the columns of ``RATING_COLUMNS``; ``user`` and ``item`` are contiguous
indices into the vocabularies (1-based: row 0 of every embedding table is the out-of-vocabulary
row used when serving an unknown id). Categorical side features are indices too, with 0 meaning
"unknown/absent", so every table has ``vocab_sizes[name]`` rows including that row.

``users.parquet``: ``user`` (int32 index), ``user_id`` (int64 raw GroupLens id) and, when the set
has them, ``gender``, ``age``, ``occupation``, ``zip`` (int32 indices).
``items.parquet``: ``item`` (int32 index), ``item_id`` (int64 raw id), ``title`` (string),
``genres`` (list<int32> of genre indices, possibly empty), ``year`` (int32 index, 0 = unknown).

``manifest.json`` (``SCHEMA_VERSION``)::

    {"schema_version": 1, "dataset": "ml-100k", "source": {...},
     "options": {... PrepareConfig fields that change the output ...},
     "counts": {"raw_rows": .., "skipped": {"<reason>": n}, "duplicates": n, "neutral_dropped": n,
                "train": n, "val": n, "test": n},
     "positive_rate": {"train": .., "val": .., "test": ..},
     "vocab_sizes": {"user": U+1, "item": I+1, "gender": .., "age": .., "occupation": ..,
                     "zip": .., "genres": .., "year": ..},
     "vocab": {"gender": ["F", "M"], "age": [...], "occupation": [...], "zip": [...],
               "genres": [...], "year": [...]},     # position p <-> index p + 1
     "user_features": ["user", "gender", "age", "occupation", "zip"],   # those present
     "item_features": ["item", "genres", "year"],
     "files": {"train/part-00000.parquet": {"rows": n, "sha256": "..."}, ...}}
"""
from __future__ import annotations

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
SPLITS = ("train", "val", "test")

# rating shard columns and their Arrow types
RATING_COLUMNS = {
    "user": "int32",
    "item": "int32",
    "rating": "float32",
    "label": "float32",
    "timestamp": "int64",
}

USER_SIDE_FEATURES = ("gender", "age", "occupation", "zip")
ITEM_SIDE_FEATURES = ("genres", "year")  # genres is multi-valued (jagged)
MULTI_VALUED = ("genres",)
