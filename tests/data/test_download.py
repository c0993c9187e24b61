"""The download path against a real local HTTP server serving a synthetic GroupLens-style zip:
success (then cached), checksum mismatch, published .md5 for sets without a known value, and the
offline fail-fast message."""
from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from twotower_lit.config import PrepareConfig
from twotower_lit.data import download as D
from twotower_lit.data.prepare import prepare_dataset


class _Server:
    """python's http.server on 127.0.0.1 in a thread, serving one folder and counting requests."""

    def __init__(self, root: Path):
        self.root = root
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                outer.requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/movielens"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip_dir(src: Path, archive: Path, top: str) -> str:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.iterdir()):
            if not f.name.startswith("."):
                zf.write(f, f"{top}/{f.name}")
    return hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture
def grouplens(tmp_path, synthetic_movielens):
    """A local 'files.grouplens.org' with ml-1m.zip (folder ml-1m/) and ml-latest-small.zip + .md5."""
    root = tmp_path / "www" / "datasets" / "movielens"
    root.mkdir(parents=True)
    md5 = {"ml-1m": _zip_dir(synthetic_movielens("ml-1m"), root / "ml-1m.zip", "ml-1m"),
           "ml-latest-small": _zip_dir(synthetic_movielens("ml-latest-small"), root / "ml-latest-small.zip",
                                       "ml-latest-small")}
    (root / "ml-latest-small.zip.md5").write_text(f"{md5['ml-latest-small']}  ml-latest-small.zip\n")
    server = _Server(tmp_path / "www")
    yield server, md5
    server.close()


def test_download_verifies_caches_and_prepares(grouplens, tmp_path, monkeypatch):
    server, md5 = grouplens
    monkeypatch.setitem(D.KNOWN_MD5, "ml-1m", md5["ml-1m"])  # our synthetic zip stands in for the real one
    monkeypatch.setenv(D.BASE_URL_ENV, server.url)
    cache = tmp_path / "cache"
    m = prepare_dataset(PrepareConfig(download="ml-1m", cache_dir=str(cache), min_shards=2), str(tmp_path / "out"),
                        log=lambda _: None)
    assert m["dataset"] == "ml-1m" and m["counts"]["raw_rows"] == 3000
    assert m["source"]["kind"] == "download" and m["source"]["download"]["md5"] == md5["ml-1m"]
    assert (cache / "ml-1m.zip").exists() and (cache / "ml-1m" / "ml-1m" / "ratings.dat").exists()
    assert server.requests == ["/datasets/movielens/ml-1m.zip"]
    # second time: from the cache, no request
    root, info = D.download_dataset("ml-1m", str(cache), log=None)
    assert Path(root) == cache / "ml-1m" / "ml-1m" and server.requests == ["/datasets/movielens/ml-1m.zip"]
    assert info["checked_against"] == "known value"


def test_checksum_mismatch_fails_and_deletes(grouplens, tmp_path):
    server, md5 = grouplens
    assert D.KNOWN_MD5["ml-1m"] != md5["ml-1m"]  # the real GroupLens value does not match our synthetic zip
    with pytest.raises(D.DownloadError, match="does not match the expected") as info:
        D.download_dataset("ml-1m", str(tmp_path / "cache"), base=server.url, log=None)
    assert D.KNOWN_MD5["ml-1m"] in str(info.value) and md5["ml-1m"] in str(info.value)
    assert not (tmp_path / "cache" / "ml-1m.zip").exists() and not (tmp_path / "cache" / "ml-1m").exists()


def test_sets_without_known_value_use_the_published_md5(grouplens, tmp_path):
    server, md5 = grouplens
    assert "ml-latest-small" not in D.KNOWN_MD5
    root, info = D.download_dataset("ml-latest-small", str(tmp_path / "cache"), base=server.url, log=None)
    assert info["checked_against"].endswith("ml-latest-small.zip.md5") and info["md5"] == md5["ml-latest-small"]
    assert (Path(root) / "ratings.csv").exists()
    # a tampered .md5 (or zip) is caught
    www = server.root / "datasets" / "movielens"
    (www / "ml-latest-small.zip.md5").write_text("f" * 32 + "  ml-latest-small.zip\n")
    with pytest.raises(D.DownloadError, match="does not match"):
        D.download_dataset("ml-latest-small", str(tmp_path / "cache2"), base=server.url, log=None)


def test_offline_fails_fast_with_a_way_out(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/datasets/movielens"
    start = time.time()
    with pytest.raises(D.DownloadError) as info:
        D.download_dataset("ml-1m", str(tmp_path / "cache"), base=dead, timeout=2, log=None)
    assert time.time() - start < 5
    msg = str(info.value)
    assert "could not download" in msg and "--data-dir" in msg and D.BASE_URL_ENV in msg
    assert "ml-1m.zip" in msg


def test_unknown_name_and_unsafe_archive(tmp_path, grouplens):
    server, _ = grouplens
    with pytest.raises(ValueError, match="unknown dataset"):
        D.download_dataset("ml-2m", str(tmp_path), base=server.url, log=None)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(D.DownloadError, match="outside"):
        D._safe_extract(str(evil), str(tmp_path / "dest"))
