"""Copying folders between the local disk and S3 (prepared shards up, data capture down)."""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

from twotower_lit.aws.session import parse_s3_uri

log = logging.getLogger(__name__)


def _local_files(root: str) -> List[str]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        out += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files)
                if not f.startswith(".") and not f.endswith(".lock")]
    return out


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_objects(s3, uri: str) -> Dict[str, Dict]:
    """``{key relative to the prefix: object summary}`` of everything under an S3 prefix."""
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out: Dict[str, Dict] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = obj
    return out


def upload_directory(s3, local_dir: str, uri: str, workers: int = 8) -> Dict[str, int]:
    """Upload every file under `local_dir` to the S3 prefix `uri`, keeping relative paths.

    Files already there with the same size and MD5 (the ETag of a single-part upload) are
    skipped, so re-running a launch does not re-upload unchanged shards. Returns counts."""
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"{local_dir}: not a directory")
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.rstrip("/")
    existing = list_objects(s3, uri)
    todo = []
    files = _local_files(local_dir)
    for rel in files:
        path = os.path.join(local_dir, rel)
        key_rel = rel.replace(os.sep, "/")
        have = existing.get(key_rel)
        if have and have["Size"] == os.path.getsize(path) and have["ETag"].strip('"') == _md5(path):
            continue
        todo.append((path, f"{prefix}/{key_rel}" if prefix else key_rel))

    def put(item) -> None:
        s3.upload_file(item[0], bucket, item[1])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(put, todo))
    counts = {"uploaded": len(todo), "unchanged": len(files) - len(todo)}
    log.info("uploaded %d files to %s (%d unchanged)", counts["uploaded"], uri, counts["unchanged"])
    return counts


def download_prefix(s3, uri: str, local_dir: str, keep: Optional[Callable[[str], bool]] = None,
                    workers: int = 8) -> List[str]:
    """Download every object under the S3 prefix `uri` (those `keep(relative key)` accepts) into
    `local_dir`, keeping relative paths; returns the local paths."""
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    rels = [rel for rel in list_objects(s3, uri) if rel and not rel.endswith("/") and (keep is None or keep(rel))]

    def get(rel: str) -> str:
        path = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download_file(bucket, prefix + rel, path)
        return path

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(get, rels))


def upload_file(s3, path: str, uri: str) -> str:
    bucket, key = parse_s3_uri(uri)
    s3.upload_file(path, bucket, key)
    return uri


def delete_prefix(s3, uri: str) -> int:
    """Delete every object under an S3 prefix; returns how many."""
    bucket, prefix = parse_s3_uri(uri)
    keys = [prefix.rstrip("/") + "/" + rel if prefix else rel for rel in list_objects(s3, uri)]
    for lo in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[lo:lo + 1000]], "Quiet": True})
    return len(keys)
