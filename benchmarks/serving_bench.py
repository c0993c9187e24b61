"""Serving benchmark: latency and throughput of the real server, one worker, at 1 and 2 torch
threads, over random exports of 3.7k items (ml-1m's size) and 62k items (ml-32m's size).

    python -m benchmarks.serving_bench [--duration 5] [--concurrency 8]

Per configuration: a server subprocess (`python -m entrypoints.serve`), a warm-up, then
* latency: one request in flight at a time (single user, k = 10), p50 / p99 round trip and the
  server's own compute time (X-Model-Latency-Ms);
* throughput: `--concurrency` requests in flight, requests per second and p50 / p99 under load;
* in-process: the handler functions (decode, predict, encode) called directly, no HTTP, p50 / p99.
The load generator runs on the same machine and shares its cores with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from twotower_lit.config import ServeConfig
from twotower_lit.serving import handler
from twotower_lit.serving.load import http_sender, payloads, run_load
from twotower_lit.serving.synthetic import random_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: str, threads: int) -> tuple:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "entrypoints.serve", "--model-dir", model_dir, "--host", "127.0.0.1",
                             "--port", str(port), "--num-threads", str(threads), "--log-level", "warning"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/ping", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


async def _phase(url: str, users, concurrency: int, duration: float, seed: int) -> dict:
    send, close = http_sender(url + "/invocations", timeout=30, max_connections=concurrency)
    try:
        result = await run_load(send, payloads(users, 1, 10, seed), rate=0, concurrency=concurrency,
                                max_requests=10 ** 9, duration=duration, seed=seed)
    finally:
        await close()
    return result.summary()


def _in_process(model_dir: str, threads: int, users, n: int = 1000) -> dict:
    model = handler.load_model(model_dir, ServeConfig(num_threads=threads))
    bodies = payloads(users, 1, 10, 4)
    times = []
    for i in range(n + 50):
        body = next(bodies)
        t0 = time.perf_counter()
        handler.encode(handler.predict(handler.decode(body, "application/json", model.config), model), None)
        if i >= 50:
            times.append((time.perf_counter() - t0) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured phase")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight in the throughput phase")
    parser.add_argument("--users", type=int, default=6040, help="users in each random export")
    parser.add_argument("--items", type=int, nargs="+", default=[3706, 62000], help="item counts to test")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads to test")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for items in args.items:
            model_dir = os.path.join(tmp, f"items-{items}")
            random_export(model_dir, num_users=args.users, num_items=items, embedding_dim=32, user_layers=(128, 64),
                          seen_per_user=100, seed=0)
            users = list(range(1, args.users + 1))
            for threads in args.threads:
                proc, url = _start(model_dir, threads)
                try:
                    asyncio.run(_phase(url, users, 2, 1.0, 1))  # warm-up
                    lat = asyncio.run(_phase(url, users, 1, args.duration, 2))
                    thr = asyncio.run(_phase(url, users, args.concurrency, args.duration, 3))
                finally:
                    proc.terminate()
                    proc.wait(30)
                rows.append((items, threads, lat, thr, _in_process(model_dir, threads, users)))
                print(f"done: {items} items, {threads} thread(s)", file=sys.stderr)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nserver: 1 worker; requests: one user, k=10, exclude_seen; {os.cpu_count()} CPU cores shared with the "
          f"client; load average at the end {load} (other work on the machine skews these figures)")
    head = (f"{'items':>6} {'threads':>7} | {'p50 ms':>7} {'p99 ms':>7} {'server p50':>10} {'server p99':>10} | "
            f"{'req/s @' + str(args.concurrency):>10} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} | "
            f"{'in-proc p50':>11} {'p99':>6}")
    print(head)
    print("-" * len(head))
    for items, threads, lat, thr, inproc in rows:
        s = lat["server_ms"] or {"p50": float("nan"), "p99": float("nan")}
        print(f"{items:>6} {threads:>7} | {lat['latency_ms']['p50']:>7.2f} {lat['latency_ms']['p99']:>7.2f} "
              f"{s['p50']:>10.3f} {s['p99']:>10.3f} | {thr['achieved_rps']:>10.1f} {thr['latency_ms']['p50']:>7.2f} "
              f"{thr['latency_ms']['p99']:>7.2f} {lat['errors'] + thr['errors']:>6} | "
              f"{inproc['p50']:>11.3f} {inproc['p99']:>6.3f}")


if __name__ == "__main__":
    main()
