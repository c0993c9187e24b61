"""Download a GroupLens MovieLens zip, verify it against a pinned SHA-256, cache and extract it.

``https://files.grouplens.org/datasets/movielens/<name>.zip``; the base URL can be changed with
``TWOTOWER_MOVIELENS_BASE_URL`` or the ``base_url`` argument (mirrors, tests). Offline, the
first connection fails within ``timeout`` seconds with a message on how to use a local copy.

Trust comes from this file, never from the server: each known release's SHA-256 and size are
pinned below, and a set without a fixed release (ml-latest) needs the digest from the user
(``--sha256``). The checksum files GroupLens serves next to the zips are not read: whoever can
change a zip on that server (or on the way from it) can change its checksum file too.

The extraction in the cache carries a manifest (``EXTRACTION_MANIFEST``) with the archive's
digest and the size and SHA-256 of every extracted file. It is checked before each use; a cache
that no longer matches it (a file changed, added or removed) is extracted again from the archive,
itself verified again first.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from twotower_lit.config import DATASETS
from twotower_lit.data.layouts import detect_layout
from twotower_lit.data.storage import sha256_file

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"
BASE_URL_ENV = "TWOTOWER_MOVIELENS_BASE_URL"
EXTRACTION_MANIFEST = ".twotower-extraction.json"
# An archive with no pinned size (ml-latest) may not grow past this while downloading.
MAX_UNPINNED_BYTES = 4 << 30


@dataclass(frozen=True)
class Release:
    """One published GroupLens zip: its SHA-256 and size in bytes."""

    sha256: str
    bytes: int


# The zips as GroupLens publishes them. The digests agree across independent public records
# (TensorFlow Datasets' url_checksums/movielens.txt holds ml-100k, ml-1m, ml-20m, ml-25m and
# ml-latest-small with these sizes) and belong to the files whose MD5 GroupLens publishes.
# ml-latest-small is the 2018-09 edition. ml-latest is re-issued over time: no digest is pinned.
KNOWN_RELEASES: Dict[str, Release] = {
    "ml-100k": Release("50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", 4_924_029),
    "ml-1m": Release("a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", 5_917_549),
    "ml-10m": Release("813c411ccb6122564edfe752e7f80c4dcc5aa25fa94c93622f6877a7ba252862", 65_566_137),
    "ml-20m": Release("96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3", 198_702_078),
    "ml-25m": Release("8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa", 261_978_986),
    "ml-32m": Release("e4a68655d7386b8f95f2f2424b2ff975dfdd15ffd59e0d864a14dca43e99d6ee", 238_950_008),
    "ml-latest-small": Release("696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436", 978_202),
}

Log = Callable[[str], None]


class DownloadError(RuntimeError):
    """A download that failed (offline, HTTP error) or did not match its checksum."""


def base_url(override: Optional[str] = None) -> str:
    return (override or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def expected_release(name: str, sha256: Optional[str] = None) -> Tuple[str, Optional[int], str]:
    """(sha256, size or None, where the digest comes from) for set ``name``: ``sha256`` when given
    (the user vouches for that file), else the pinned release. Raises `DownloadError` for a set
    with no pinned digest and none given, before anything is fetched."""
    if sha256:
        digest = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise DownloadError(f"--sha256 {sha256!r} is not a SHA-256 digest (64 hexadecimal characters)")
        pinned = KNOWN_RELEASES.get(name)
        size = pinned.bytes if pinned is not None and pinned.sha256 == digest else None
        return digest, size, "--sha256"
    if name in KNOWN_RELEASES:
        release = KNOWN_RELEASES[name]
        return release.sha256, release.bytes, "pinned digest"
    raise DownloadError(
        f"{name} is re-issued by GroupLens from time to time, so no digest of it is pinned and the server's own "
        f"checksum file proves nothing. Pass --sha256 with the SHA-256 of the {name}.zip you trust (e.g. from "
        f"`sha256sum {name}.zip` on a copy you checked), or unzip a copy yourself and pass --data-dir")


def _fetch(url: str, dest: str, timeout: float, max_bytes: int) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            written = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                written += len(block)
                if written > max_bytes:
                    raise DownloadError(f"{url} sends more than the expected {max_bytes:,} bytes; stopped")
                out.write(block)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"could not download {url}: {reason}") from e


def _safe_extract(archive: str, dest: str) -> None:
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            target = os.path.realpath(os.path.join(dest, member))
            if not target.startswith(os.path.realpath(dest) + os.sep):
                raise DownloadError(f"{archive}: member {member!r} would be written outside {dest}")
        zf.extractall(dest)


def _data_root(extracted: str) -> str:
    """The folder holding the ratings file (GroupLens zips hold one top folder, e.g. ml-10M100K)."""
    for root, _, files in sorted(os.walk(extracted)):
        if {"u.data", "ratings.dat", "ratings.csv"} & set(files):
            return root
    raise DownloadError(f"{extracted}: the archive holds no MovieLens ratings file")


def _extracted_files(extracted: str) -> Dict[str, str]:
    """relative path -> absolute path of every file under ``extracted`` but its manifest."""
    out = {}
    for root, _, files in os.walk(extracted):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, extracted).replace(os.sep, "/")
            if rel != EXTRACTION_MANIFEST:
                out[rel] = path
    return out


def write_extraction_manifest(extracted: str, archive_sha256: str) -> Dict:
    files = {rel: {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
             for rel, path in sorted(_extracted_files(extracted).items())}
    manifest = {"archive_sha256": archive_sha256, "files": files}
    with open(os.path.join(extracted, EXTRACTION_MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def extraction_problem(extracted: str, archive_sha256: str) -> Optional[str]:
    """Why the cached extraction cannot be used as the archive ``archive_sha256`` unpacked (None:
    it can). Sizes are compared first, so most changes are found without hashing."""
    path = os.path.join(extracted, EXTRACTION_MANIFEST)
    if not os.path.isfile(path):
        return "has no extraction manifest" if os.path.isdir(extracted) else "is not there"
    try:
        with open(path) as f:
            manifest = json.load(f)
        listed = {rel: (int(meta["bytes"]), str(meta["sha256"])) for rel, meta in manifest["files"].items()}
        recorded = manifest["archive_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"has an unreadable {EXTRACTION_MANIFEST}"
    if recorded != archive_sha256:
        return f"was extracted from another archive (sha256 {recorded})"
    found = _extracted_files(extracted)
    added, removed = sorted(set(found) - set(listed)), sorted(set(listed) - set(found))
    if added:
        return f"holds {added[0]}, which the archive does not"
    if removed:
        return f"lacks {removed[0]}"
    for rel, (size, _) in sorted(listed.items()):
        if os.path.getsize(found[rel]) != size:
            return f"has {rel} changed (size {os.path.getsize(found[rel]):,} bytes, extracted {size:,})"
    for rel, (_, digest) in sorted(listed.items()):
        if sha256_file(found[rel]) != digest:
            return f"has {rel} changed (its sha256 differs from the one recorded at extraction)"
    return None


def download_dataset(name: str, cache_dir: str, base: Optional[str] = None, timeout: float = 10.0,
                     log: Optional[Log] = print, sha256: Optional[str] = None) -> Tuple[str, dict]:
    """Fetch (or reuse from ``cache_dir``) and extract GroupLens set ``name``.

    Returns (directory with the raw files, {"url", "sha256", "bytes", "checked_against"}). Raises
    `DownloadError` when offline, without a digest for an unpinned set, or on a mismatch (the bad
    file is deleted).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    expected, size, checked_against = expected_release(name, sha256)
    cache = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache, exist_ok=True)
    url = f"{base_url(base)}/{name}.zip"
    archive = os.path.join(cache, f"{name}.zip")
    extracted = os.path.join(cache, name)

    problem = extraction_problem(extracted, expected)
    if problem is None:
        root = _data_root(extracted)
        if log:
            log(f"download: using cached {name} in {root} (every file as extracted from sha256 {expected[:12]}...)")
        return root, {"url": url, "sha256": expected, "bytes": size, "checked_against": checked_against}
    if os.path.isdir(extracted) and log:
        log(f"download: the cached extraction {extracted} {problem}; extracting it again from the verified archive")

    def mismatch(path: str) -> Optional[str]:
        actual_size = os.path.getsize(path)
        if size is not None and actual_size != size:
            return f"is {actual_size:,} bytes, not the expected {size:,}"
        actual = sha256_file(path)
        return None if actual == expected else f"has sha256 {actual}, not the expected {expected}"

    stale = mismatch(archive) if os.path.isfile(archive) else None
    if stale is not None:
        if log:
            log(f"download: the cached {archive} {stale} ({checked_against}); fetching it again")
        os.remove(archive)
    if not os.path.isfile(archive):
        hint = (f"If this machine is offline, download {url} elsewhere, check that its sha256 is {expected}, unzip "
                f"it and pass the folder with --data-dir (e.g. --data-dir /path/to/{name}); or set {BASE_URL_ENV} "
                "to a reachable mirror")
        if log:
            log(f"download: fetching {url}")
        partial = archive + ".part"
        try:
            _fetch(url, partial, timeout, size if size is not None else MAX_UNPINNED_BYTES)
        except DownloadError as e:
            if os.path.exists(partial):
                os.remove(partial)
            raise DownloadError(f"{e}. {hint}") from e
        bad = mismatch(partial)
        if bad is not None:
            os.remove(partial)  # never keep a corrupt or tampered archive
            raise DownloadError(f"{url} {bad} ({checked_against}); the download was deleted. Retry; if it persists "
                                "the server or mirror serves another file than the one trusted here")
        os.replace(partial, archive)

    # Extract into a temporary folder first so an interrupted extraction is never taken as done.
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache)
    try:
        _safe_extract(archive, tmp)
        shutil.rmtree(extracted, ignore_errors=True)
        os.replace(tmp, extracted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    root = _data_root(extracted)
    detect_layout(root)  # fails clearly if the archive is not a MovieLens layout
    write_extraction_manifest(extracted, expected)
    if log:
        log(f"download: {name} verified (sha256 {expected}, {checked_against}) and extracted to {root}")
    return root, {"url": url, "sha256": expected, "bytes": size, "checked_against": checked_against}
