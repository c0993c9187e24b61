"""Where prepared data is written and read: a local directory or ``s3://bucket/prefix``.

Both go through ``pyarrow.fs`` so the rest of the code never branches on the scheme. S3 honours
the standard AWS environment (credentials chain, ``AWS_REGION``/``AWS_DEFAULT_REGION``) and the
endpoint overrides ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (moto, MinIO, LocalStack).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from typing import Optional, Tuple
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Fixed Parquet writer settings: same table -> same bytes -> same sha256 in the manifest.
# (Arrow writes no timestamps into Parquet metadata; 'created_by' names the pyarrow version.)
PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True,
                       store_schema=True, data_page_version="1.0", version="2.6")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem for the current AWS environment (endpoint override included)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or an s3:// URI."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: only local paths and s3://bucket/prefix are supported")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


class Storage:
    """A directory of files, local or on S3, addressed by relative POSIX paths."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if uri.startswith("s3://") else uri
        self.fs, self.root = resolve(uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def size(self, rel: str) -> Optional[int]:
        info = self.fs.get_file_info(self.path(rel))
        return info.size if info.type == pafs.FileType.File else None

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data) -> None:
        """Write a whole file. Locally via a temporary name + rename, so a reader (or a crash)
        never sees half a file; an S3 PUT is atomic by itself."""
        target = self.path(rel)
        parent = posixpath.dirname(target)
        if self.is_local:
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def delete_dir(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))

    def write_parquet(self, rel: str, table: pa.Table) -> dict:
        """Write ``table`` deterministically; returns ``{"rows", "bytes", "sha256"}`` of the file."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **PARQUET_OPTIONS)
        buf = sink.getvalue()
        self.write_bytes(rel, buf)
        return {"rows": table.num_rows, "bytes": buf.size, "sha256": hashlib.sha256(buf).hexdigest()}


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    """sha256 of a local file, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)
