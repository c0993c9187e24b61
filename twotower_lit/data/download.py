"""Download a GroupLens MovieLens zip, verify its checksum, cache and extract it.

``https://files.grouplens.org/datasets/movielens/<name>.zip``; the base URL can be changed with
``TWOTOWER_MOVIELENS_BASE_URL`` or the ``base_url`` argument (mirrors, tests). Offline, the
first connection fails within ``timeout`` seconds with a message on how to use a local copy.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Callable, Dict, Optional, Tuple

from twotower_lit.config import DATASETS
from twotower_lit.data.layouts import detect_layout

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"
BASE_URL_ENV = "TWOTOWER_MOVIELENS_BASE_URL"

# Known checksums of the published zips. The md5 values are the ones GroupLens publishes next to
# each zip (<name>.zip.md5) and agree across independent public download scripts. ml-latest and
# ml-latest-small are re-issued from time to time (the small one exists in a 2016 and a 2018
# edition) so no fixed value is kept for them: they are checked against the .md5 file fetched
# alongside the zip at download time.
KNOWN_MD5: Dict[str, str] = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-10m": "ce571fd55effeba0271552578f2648bd",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
    "ml-32m": "d472be332d4daa821edc399621853b57",
}

Log = Callable[[str], None]


class DownloadError(RuntimeError):
    """A download that failed (offline, HTTP error) or did not match its checksum."""


def base_url(override: Optional[str] = None) -> str:
    return (override or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def _fetch(url: str, dest: str, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"could not download {url}: {reason}") from e


def _digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expected_md5(name: str, url: str, timeout: float) -> Tuple[str, str]:
    """(md5, where it came from): the table above, else GroupLens's published <zip>.md5."""
    if name in KNOWN_MD5:
        return KNOWN_MD5[name], "known value"
    with tempfile.TemporaryDirectory() as tmp:
        md5_file = os.path.join(tmp, "md5")
        _fetch(url + ".md5", md5_file, timeout)
        with open(md5_file, encoding="ascii", errors="replace") as f:
            text = f.read().split()
    if not text or len(text[0]) != 32:
        raise DownloadError(f"{url}.md5 does not hold an md5 checksum")
    return text[0].lower(), f"{url}.md5"


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


def download_dataset(name: str, cache_dir: str, base: Optional[str] = None, timeout: float = 10.0,
                     log: Optional[Log] = print) -> Tuple[str, dict]:
    """Fetch (or reuse from ``cache_dir``) and extract GroupLens set ``name``.

    Returns (directory with the raw files, {"url", "md5", "checked_against"}). Raises
    `DownloadError` when offline or on a checksum mismatch (the bad file is deleted).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    cache = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache, exist_ok=True)
    url = f"{base_url(base)}/{name}.zip"
    archive = os.path.join(cache, f"{name}.zip")
    extracted = os.path.join(cache, name)
    done_marker = os.path.join(extracted, ".extracted")
    hint = (f"If this machine is offline, download {url} elsewhere, unzip it, and pass the folder with "
            f"--data-dir (e.g. --data-dir /path/to/{name}); or set {BASE_URL_ENV} to a reachable mirror")
    try:
        expected, checked_against = _expected_md5(name, url, timeout)
        if os.path.isfile(done_marker) and open(done_marker).read().strip() == expected:
            root = _data_root(extracted)
            if log:
                log(f"download: using cached {name} in {root}")
            return root, {"url": url, "md5": expected, "checked_against": checked_against}
        if not (os.path.isfile(archive) and _digest(archive, "md5") == expected):
            if log:
                log(f"download: fetching {url}")
            partial = archive + ".part"
            _fetch(url, partial, timeout)
            os.replace(partial, archive)
    except DownloadError as e:
        raise DownloadError(f"{e}. {hint}") from e
    actual = _digest(archive, "md5")
    if actual != expected:
        os.remove(archive)  # never reuse a corrupt or tampered archive
        raise DownloadError(f"{url}: md5 {actual} does not match the expected {expected} ({checked_against}); "
                            "the download was deleted. Retry; if it persists the mirror serves a different file")
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
    with open(done_marker, "w") as f:
        f.write(expected)
    if log:
        log(f"download: {name} verified (md5 {expected}, {checked_against}) and extracted to {root}")
    return root, {"url": url, "md5": expected, "checked_against": checked_against}
