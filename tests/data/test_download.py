"""The download path against a real local HTTP server serving synthetic GroupLens-style zips:
success (then cached), a pinned SHA-256 that the served zip does not match, the server's own .md5
never consulted, ml-latest only with a user-given digest, a tampered cached extraction found and
extracted again, and the offline fail-fast message."""
from __future__ import annotations

import functools
import hashlib
import json
import http.server
import socket
import threading
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest

from twotower_lit.config import DATASETS, PrepareConfig
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


class Zip(NamedTuple):
    sha256: str
    bytes: int


def _zip_dir(src: Path, archive: Path, top: str) -> Zip:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.iterdir()):
            if not f.name.startswith("."):
                zf.write(f, f"{top}/{f.name}")
    return Zip(hashlib.sha256(archive.read_bytes()).hexdigest(), archive.stat().st_size)


@pytest.fixture
def grouplens(tmp_path, synthetic_movielens):
    """A local 'files.grouplens.org' with ml-1m.zip (folder ml-1m/), ml-latest-small.zip and
    ml-latest.zip, each with the .md5 file GroupLens puts beside its zips (matching the zip served)."""
    root = tmp_path / "www" / "datasets" / "movielens"
    root.mkdir(parents=True)
    releases = {}
    for name, layout in (("ml-1m", "ml-1m"), ("ml-latest-small", "ml-latest-small"), ("ml-latest", "ml-latest")):
        releases[name] = _zip_dir(synthetic_movielens(layout), root / f"{name}.zip", name)
        md5 = hashlib.md5((root / f"{name}.zip").read_bytes()).hexdigest()
        (root / f"{name}.zip.md5").write_text(f"{md5}  {name}.zip\n")
    server = _Server(tmp_path / "www")
    yield server, releases
    server.close()


def test_download_verifies_caches_and_prepares(grouplens, tmp_path, monkeypatch):
    server, releases = grouplens
    # our synthetic zip stands in for the real one
    monkeypatch.setitem(D.KNOWN_RELEASES, "ml-1m", D.Release(*releases["ml-1m"]))
    monkeypatch.setenv(D.BASE_URL_ENV, server.url)
    cache = tmp_path / "cache"
    m = prepare_dataset(PrepareConfig(download="ml-1m", cache_dir=str(cache), min_shards=2), str(tmp_path / "out"),
                        log=lambda _: None)
    assert m["dataset"] == "ml-1m" and m["counts"]["raw_rows"] == 3000
    info = m["source"]["download"]
    assert m["source"]["kind"] == "download" and info["sha256"] == releases["ml-1m"].sha256
    assert info["bytes"] == releases["ml-1m"].bytes and info["checked_against"] == "pinned digest"
    assert (cache / "ml-1m.zip").exists() and (cache / "ml-1m" / "ml-1m" / "ratings.dat").exists()
    assert server.requests == ["/datasets/movielens/ml-1m.zip"]  # the zip only: no .md5
    # second time: from the cache (checked against its extraction manifest), no request
    root, info = D.download_dataset("ml-1m", str(cache), log=None)
    assert Path(root) == cache / "ml-1m" / "ml-1m" and server.requests == ["/datasets/movielens/ml-1m.zip"]
    manifest = json.loads((cache / "ml-1m" / D.EXTRACTION_MANIFEST).read_text())
    assert manifest["archive_sha256"] == releases["ml-1m"].sha256
    assert set(manifest["files"]) == {"ml-1m/ratings.dat", "ml-1m/movies.dat", "ml-1m/users.dat"}


def test_pinned_digests_are_sha256_of_every_known_release():
    assert set(D.KNOWN_RELEASES) == set(DATASETS) - {"ml-latest"}
    for release in D.KNOWN_RELEASES.values():
        assert len(release.sha256) == 64 and int(release.sha256, 16) >= 0 and release.bytes > 0


def test_checksum_mismatch_fails_and_deletes(grouplens, tmp_path, monkeypatch):
    server, releases = grouplens
    pinned = D.KNOWN_RELEASES["ml-1m"]
    assert pinned.sha256 != releases["ml-1m"].sha256  # the real release does not match our synthetic zip
    with pytest.raises(D.DownloadError, match="not the expected") as info:
        D.download_dataset("ml-1m", str(tmp_path / "cache"), base=server.url, log=None)
    assert f"{releases['ml-1m'].bytes:,} bytes" in str(info.value) and "pinned digest" in str(info.value)
    assert not (tmp_path / "cache" / "ml-1m.zip").exists() and not (tmp_path / "cache" / "ml-1m").exists()
    assert not list((tmp_path / "cache").glob("*.part"))
    # the size of the zip served, other bytes than pinned: the sha256 decides
    monkeypatch.setitem(D.KNOWN_RELEASES, "ml-1m", D.Release(pinned.sha256, releases["ml-1m"].bytes))
    with pytest.raises(D.DownloadError, match=f"has sha256 {releases['ml-1m'].sha256}, not the expected"):
        D.download_dataset("ml-1m", str(tmp_path / "cache"), base=server.url, log=None)


def test_the_servers_md5_is_not_what_the_check_relies_on(grouplens, tmp_path):
    """ml-latest-small: the zip served and its .md5 agree, but the zip is not the pinned release."""
    server, releases = grouplens
    www = server.root / "datasets" / "movielens"
    served_md5 = (www / "ml-latest-small.zip.md5").read_text().split()[0]
    assert served_md5 == hashlib.md5((www / "ml-latest-small.zip").read_bytes()).hexdigest()
    with pytest.raises(D.DownloadError, match="not the expected"):
        D.download_dataset("ml-latest-small", str(tmp_path / "cache"), base=server.url, log=None)
    assert not any(path.endswith(".md5") for path in server.requests)


def test_ml_latest_needs_a_digest_from_the_user(grouplens, tmp_path):
    server, releases = grouplens
    with pytest.raises(D.DownloadError, match="no digest of it is pinned.*--sha256"):
        D.download_dataset("ml-latest", str(tmp_path / "cache"), base=server.url, log=None)
    assert server.requests == []  # refused before anything is fetched
    wrong = hashlib.sha256(b"another edition").hexdigest()
    with pytest.raises(D.DownloadError, match=f"not the expected {wrong} \\(--sha256\\)"):
        D.download_dataset("ml-latest", str(tmp_path / "cache"), base=server.url, log=None, sha256=wrong)
    root, info = D.download_dataset("ml-latest", str(tmp_path / "cache"), base=server.url, log=None,
                                    sha256=releases["ml-latest"].sha256.upper())
    assert (Path(root) / "ratings.csv").exists() and info["checked_against"] == "--sha256"
    assert not any(path.endswith(".md5") for path in server.requests)
    with pytest.raises(D.DownloadError, match="is not a SHA-256 digest"):
        D.download_dataset("ml-latest", str(tmp_path / "cache"), base=server.url, log=None, sha256="abc")
    with pytest.raises(ValueError, match="--sha256 is the digest of a --download zip"):
        prepare_dataset(PrepareConfig(data_dir=str(root), sha256=releases["ml-latest"].sha256),
                        str(tmp_path / "out"), log=lambda _: None)


def test_a_tampered_cached_extraction_is_found_and_extracted_again(grouplens, tmp_path, monkeypatch):
    server, releases = grouplens
    monkeypatch.setitem(D.KNOWN_RELEASES, "ml-1m", D.Release(*releases["ml-1m"]))
    cache = tmp_path / "cache"
    root, _ = D.download_dataset("ml-1m", str(cache), base=server.url, log=None)
    ratings = Path(root) / "ratings.dat"
    original = ratings.read_bytes()
    logs = []

    def again() -> str:
        logs.clear()
        return D.download_dataset("ml-1m", str(cache), base=server.url, log=logs.append)[0]

    # a changed rating, same size: found by its sha256
    ratings.write_bytes(original.replace(b"::4::", b"::5::", 1))
    assert again() == root and ratings.read_bytes() == original
    assert any("has ml-1m/ratings.dat changed (its sha256 differs" in line for line in logs)
    # an added side file (it would change what the layout detection sees), a removed one
    (Path(root) / "tags.dat").write_text("1::1::planted::978300760\n")
    again()
    assert not (Path(root) / "tags.dat").exists() and any("holds ml-1m/tags.dat" in line for line in logs)
    (Path(root) / "users.dat").unlink()
    again()
    assert (Path(root) / "users.dat").exists() and any("lacks ml-1m/users.dat" in line for line in logs)
    assert server.requests == ["/datasets/movielens/ml-1m.zip"]  # all from the verified cached archive

    # prepare reads the restored bytes, not the tampered ones
    with open(ratings, "ab") as f:
        f.write(b"1::1::1::978300760\n")
    m = prepare_dataset(PrepareConfig(download="ml-1m", cache_dir=str(cache), min_shards=1), str(tmp_path / "out"),
                        log=lambda _: None)
    assert m["counts"]["raw_rows"] == 3000 and ratings.read_bytes() == original

    # the archive tampered too: fetched again, then extracted
    (cache / "ml-1m.zip").write_bytes(b"PK not the archive")
    ratings.write_bytes(b"")
    again()
    assert ratings.read_bytes() == original and len(server.requests) == 2
    assert any("ml-1m.zip is 18 bytes" in line for line in logs)


def test_a_tampered_cache_without_a_reachable_archive_is_refused(grouplens, tmp_path, monkeypatch):
    server, releases = grouplens
    monkeypatch.setitem(D.KNOWN_RELEASES, "ml-1m", D.Release(*releases["ml-1m"]))
    cache = tmp_path / "cache"
    root, _ = D.download_dataset("ml-1m", str(cache), base=server.url, log=None)
    (cache / "ml-1m.zip").unlink()
    (Path(root) / "ratings.dat").write_bytes(b"1::1::5::978300760\n")
    server.close()
    with pytest.raises(D.DownloadError, match="could not download .*ml-1m.zip.*--data-dir"):
        D.download_dataset("ml-1m", str(cache), base=server.url, timeout=2, log=None)


def test_a_download_larger_than_the_release_is_cut_off(grouplens, tmp_path, monkeypatch):
    server, releases = grouplens
    monkeypatch.setitem(D.KNOWN_RELEASES, "ml-1m", D.Release(releases["ml-1m"].sha256, 1000))
    with pytest.raises(D.DownloadError, match="sends more than the expected 1,000 bytes"):
        D.download_dataset("ml-1m", str(tmp_path / "cache"), base=server.url, log=None)
    assert not list((tmp_path / "cache").iterdir())


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
    assert "ml-1m.zip" in msg and D.KNOWN_RELEASES["ml-1m"].sha256 in msg


def test_unknown_name_and_unsafe_archive(tmp_path, grouplens):
    server, _ = grouplens
    with pytest.raises(ValueError, match="unknown dataset"):
        D.download_dataset("ml-2m", str(tmp_path), base=server.url, log=None)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(D.DownloadError, match="outside"):
        D._safe_extract(str(evil), str(tmp_path / "dest"))
