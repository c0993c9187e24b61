"""Serving fixtures: small random exported models and the real server as a subprocess.

Fault injection for shadow tests goes through ``TWOTOWER_FAULT_INJECTION`` (see
`twotower_lit.serving.faults`), set only in the environment of the server processes started here.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from twotower_lit.serving.synthetic import random_export  # noqa: E402

NUM_USERS, NUM_ITEMS = 50, 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """Production model: 50 users (raw ids 1..50), 200 items (raw ids 1, 11, 21, ...)."""
    path = str(tmp_path_factory.mktemp("models") / "production")
    random_export(path, NUM_USERS, NUM_ITEMS, seed=0)
    return path


@pytest.fixture(scope="session")
def shadow_model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / "shadow")
    random_export(path, NUM_USERS, NUM_ITEMS, seed=1)
    return path


class ServerProcess:
    """`python -m entrypoints.serve` on 127.0.0.1 and a free port; stop() sends SIGTERM."""

    def __init__(self, args: List[str], log_path: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "entrypoints.serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *args]
        full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not answer /ping in 90 s:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait for a graceful exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server did not stop within {timeout} s of SIGTERM:\n{self.log()[-4000:]}")
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path):
    """``start(args, env=None) -> ServerProcess``; every server still running is stopped at teardown."""
    started: List[ServerProcess] = []

    def start(args: List[str], env: Optional[Dict[str, str]] = None) -> ServerProcess:
        server = ServerProcess(args, tmp_path / f"server-{len(started)}.log", env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One production-only server shared by a test module."""
    s = ServerProcess(["--model-dir", model_dir, "--max-body-bytes", "65536", "--request-timeout", "2",
                       "--body-timeout", "2"],
                      tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.stop()


def capture_files(capture_dir: Path, variant: str) -> List[Path]:
    return sorted(capture_dir.glob(f"*/{variant}/*/*/*/*/*.jsonl"))


def capture_lines(capture_dir: Path, variant: str) -> List[str]:
    return [line for f in capture_files(capture_dir, variant) for line in f.read_text().splitlines() if line.strip()]


async def trickle(port: int, head: bytes, drip: bytes, interval: float = 0.2, give_up: float = 12.0):
    """Send `head`, then `drip` every `interval` until the server closes the connection:
    (status or None when closed without an answer, seconds, response bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    if head:
        writer.write(head)
    answer = asyncio.ensure_future(reader.read())  # all of it, until the server closes
    try:
        while time.perf_counter() - t0 < give_up:
            done, _ = await asyncio.wait({answer}, timeout=interval)
            if done:
                data = answer.result() if not answer.exception() else b""
                return (int(data.split()[1]) if data else None), time.perf_counter() - t0, data
            if drip:
                try:
                    writer.write(drip)
                    await writer.drain()
                except ConnectionError:
                    pass
        return "still open", time.perf_counter() - t0, b""
    finally:
        answer.cancel()
        writer.close()


def documented_verdict(report: dict) -> str:
    """The verdict a shadow report must carry, worked out from its own figures by the rules in the
    order `twotower_lit.serving.report` documents them, so a test can check
    the verdict of a run whose figures it cannot fix in advance."""
    t = report["thresholds"]
    if report["joined_requests"] < t["min_requests"]:
        return "inconclusive"
    prod, shad = report["variants"]["production"], report["variants"]["shadow"]
    p99p, p99s = prod["model_latency_ms"].get("p99"), shad["model_latency_ms"].get("p99")
    if shad["error_rate"] > prod["error_rate"] + t["max_error_rate_increase"] or \
            (p99p and (p99s is None or p99s > t["max_latency_ratio"] * p99p)):
        return "keep"
    quality = report["quality"]
    if quality is None or quality["labelled_users"] < t["min_labelled_users"]:
        return "inconclusive"
    lo, hi = quality["ndcg_diff_ci95"]
    assert lo <= quality["ndcg_diff"] <= hi, "the interval holds the mean difference"
    if lo > 0:
        return "promote"
    if hi < 0 or (-t["equivalence_margin"] <= lo and hi <= t["equivalence_margin"]):
        return "keep"
    return "inconclusive"
