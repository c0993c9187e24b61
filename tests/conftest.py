"""Shared fixtures: a real moto S3 server, and small synthetic MovieLens directories in every layout."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # tests run from any directory without installing the package
    sys.path.insert(0, str(REPO))

from twotower_lit.config import DATASETS  # noqa: E402

REAL_MOVIELENS = Path(os.environ.get("TWOTOWER_REAL_MOVIELENS", REPO.parent / "shared" / "data" / "movielens"))
FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


# What some tests need from outside the virtualenv: the SageMaker SDK environments scripts/setup.sh
# builds, the real MovieLens sets in shared/, the notebook and faiss packages. A missing one is a skip
# that the run's summary names in a section of its own; TWOTOWER_REQUIRED_ENVIRONMENTS (a comma list
# of kinds, or "all"; CI sets it) turns it into a failure, so CI cannot pass with them silently absent.
MISSING = "missing test environment"
REQUIRED_ENVIRONMENTS = {k.strip() for k in os.environ.get("TWOTOWER_REQUIRED_ENVIRONMENTS", "").split(",")
                         if k.strip()}


def missing_environment(kind: str, message: str) -> None:
    """Skip the calling test because its `kind` of environment is absent (`message`: what is missing
    and how to get it), or fail it when that kind is required here."""
    reason = f"{MISSING} ({kind}): {message}"
    if kind in REQUIRED_ENVIRONMENTS or "all" in REQUIRED_ENVIRONMENTS:
        pytest.fail(f"{reason} (TWOTOWER_REQUIRED_ENVIRONMENTS requires it)", pytrace=False)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the tests skipped for a missing environment in the normal output, not only under -ra."""
    lines = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if MISSING in reason:
            lines.append(f"{report.nodeid}: {reason[reason.index(MISSING):]}")
    if lines:
        terminalreporter.section("tests not run: environments missing", sep="!", yellow=True, bold=True)
        for line in lines:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"{len(lines)} test(s) did not run; set TWOTOWER_REQUIRED_ENVIRONMENTS=all to make "
                                    "this a failure (CI does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real ``moto_server`` process on 127.0.0.1; yields its endpoint URL.

    Fake AWS credentials are put in the environment for the session (and restored after), so
    boto3 and pyarrow never reach real AWS. Point clients at the URL (``endpoint_url=`` or
    ``AWS_ENDPOINT_URL``)."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    port = free_port()
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    saved = {k: os.environ.get(k) for k in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
                if time.time() > deadline:
                    raise RuntimeError("moto_server did not answer within 30 s")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MakeMovieLens = Callable[..., Path]


@pytest.fixture(scope="session")
def synthetic_movielens(tmp_path_factory) -> MakeMovieLens:
    """``make(layout, n_ratings=3000, seed=0) -> Path``: a raw synthetic MovieLens directory in
    that GroupLens layout (cached per session; copy it before editing files)."""
    from twotower_lit.data.synthetic import generate_movielens

    root = tmp_path_factory.mktemp("movielens")

    def make(layout: str = "ml-1m", n_ratings: int = 3000, seed: int = 0) -> Path:
        if layout not in DATASETS:
            raise ValueError(f"unknown layout {layout}")
        path = root / f"{layout}-{n_ratings}-{seed}" / layout
        if not path.exists():
            generate_movielens(str(path), n_ratings, layout, seed=seed, log=None)
        return path

    return make


@pytest.fixture
def movielens_copy(synthetic_movielens, tmp_path) -> MakeMovieLens:
    """Like `synthetic_movielens` but a private copy the test may edit."""

    def make(layout: str = "ml-1m", n_ratings: int = 3000, seed: int = 0) -> Path:
        src = synthetic_movielens(layout, n_ratings, seed)
        dst = tmp_path / "raw" / layout
        shutil.copytree(src, dst)
        return dst

    return make
