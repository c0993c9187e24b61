"""Serving benchmark: the real server (one worker, one torch thread, micro-batching on) over random
exports of 3,706 items (ml-1m's catalogue), 62,000 (ml-32m's) and 1,000,000 (or 10M), driven by an
open-loop load generator at fixed rates and to saturation.

    python -m benchmarks.serving_bench --items 3706 62000 1000000 --duration 10 --json benchmarks/serving.jsonl

Per catalogue: a random export (item vectors clustered, as a trained catalogue's are; 6,040 users
with 100 seen items each), an index built into it when the search is approximate (``--search``:
exact up to ``--exact-max-items``, else ``--index``), a server subprocess, a warm-up, then

* saturation: ``--concurrency`` requests kept in flight, the requests per second answered;
* fixed rates (``--rates``, default 200 500 1000 req/s): p50 / p99 round trip at each;
* with ``--shadow-items N`` (default: the smallest catalogue), the same export again with a shadow
  variant mirrored at 100%: production's p99 at ``--shadow-rate`` with and without it.

The load generator is ``hey`` (a compiled Go client: Debian's package ``hey``, pinned as
``hey=0.1.4-2+b4``; ``apt-get install hey``), rate-limited per worker: ``W`` workers each sending
``rate / W`` per second with 50 ms between a worker's requests, so that a worker's next request does
not wait for an answer slower than that. Without it (or with ``--client python``), several
processes of `twotower_lit.serving.load` send Poisson arrivals instead. The client shares the cores
with the server: its CPU use is measured (its own rusage) and reported beside the figures.

One JSON line per configuration (catalogue, search, shadow) is appended to ``--json``: items,
search, rps (saturation), p50_ms / p99_ms (at ``--latency-rate``), recall_at_10 (1.0 for exact),
shadow, the figures at every rate, the client's and the server's CPU, the index's size and build
time, and the machine with its load average.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USERS = 6040
BODY = b'{"user_id": 17, "k": 10}'
HEY_PIN = "0.1.4-2+b4"  # Debian's hey package, the version these figures were taken with


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine() -> Dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version()}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# the export --------------------------------------------------------------------------------------

def prepare_export(root: str, items: int, search: str, index_params: Dict, log) -> Dict:
    """A random export of `items` items under `root` (reused when already there), with the index
    `search` names built into it; returns the search's index.json entry (exact: recall 1.0)."""
    from twotower_lit.export.index import build_index
    from twotower_lit.export.search import read_index_meta
    from twotower_lit.serving.synthetic import random_export

    model_dir = os.path.join(root, f"items-{items}")
    done = os.path.join(model_dir, ".complete")
    if not os.path.exists(done):
        shutil.rmtree(model_dir, ignore_errors=True)
        t0 = time.perf_counter()
        random_export(model_dir, num_users=USERS, num_items=items, embedding_dim=32, user_layers=(128, 64),
                      seen_per_user=100, item_clusters=max(10, items // 1000), seed=0)
        open(done, "w").close()
        log(f"export of {items} items written in {time.perf_counter() - t0:.1f} s")
    if search == "exact":
        return {"name": "exact", "kind": "exact", "recall_at_10": 1.0, "bytes": 0, "build_s": 0.0}
    kind, _, dtype = search.partition("-")
    meta = read_index_meta(model_dir) or {"indexes": {}}
    entry = meta["indexes"].get(search)
    if entry is None or any(entry["params"].get(k) != v for k, v in index_params.items()):
        entry = build_index(model_dir, kind, index_params, dtype or "fp32", recall_users=1000, log=log)
    return dict(entry, name=search)


# load generation ----------------------------------------------------------------------------------

def _percentiles(lat_ms: np.ndarray) -> Dict:
    if not len(lat_ms):
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": round(float(np.percentile(lat_ms, 50)), 3), "p99_ms": round(float(np.percentile(lat_ms, 99)), 3)}


def hey_phase(url: str, duration: float, rate: Optional[float], concurrency: int) -> Dict:
    """One phase through hey: `rate` req/s spread over workers (None: `concurrency` workers flat out)."""
    workers = concurrency if rate is None else max(1, int(round(rate / 20)))  # 20/s each: 50 ms apart
    cmd = ["hey", "-z", f"{duration}s", "-c", str(workers), "-m", "POST", "-T", "application/json",
           "-d", BODY.decode(), "-o", "csv", "-t", "10"]
    if rate is not None:
        cmd += ["-q", f"{rate / workers:.4f}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + [url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"hey failed ({proc.returncode}): {err[-500:]}")
    rows = [line.split(",") for line in out.splitlines()[1:] if line and line[0].isdigit()]
    lat = np.asarray([float(r[0]) * 1000 for r in rows])
    ok = sum(1 for r in rows if r[6] == "200")
    span = max((float(r[7]) + float(r[0]) for r in rows), default=duration)
    return {"requests": len(rows), "errors": len(rows) - ok, "achieved_rps": round(len(rows) / max(span, 1e-9), 1),
            **_percentiles(lat), "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "client_wall_s": round(wall, 2)}


def _python_worker(url: str, rate: float, concurrency: int, duration: float, seed: int, queue) -> None:
    from twotower_lit.serving.load import http_sender, payloads, run_load

    async def main():
        send, close = http_sender(url, timeout=10, max_connections=concurrency)
        try:
            return await run_load(send, payloads(list(range(1, USERS + 1)), 1, 10, seed), rate=rate,
                                  concurrency=concurrency, max_requests=10 ** 9, duration=duration, seed=seed)
        finally:
            await close()

    result = asyncio.run(main())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    queue.put(([o.latency_s * 1000 for o in result.outcomes], [o.status for o in result.outcomes],
               result.wall_s, usage.ru_utime + usage.ru_stime))


def python_phase(url: str, duration: float, rate: Optional[float], concurrency: int, processes: int) -> Dict:
    """One phase through `processes` processes of the Python generator (Poisson arrivals)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    per_rate = 0.0 if rate is None else rate / processes
    procs = [ctx.Process(target=_python_worker, args=(url, per_rate, max(1, concurrency // processes), duration,
                                                      i, queue)) for i in range(processes)]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    lat = np.concatenate([np.asarray(p[0]) for p in parts])
    ok = sum(1 for p in parts for s in p[1] if s == 200)
    wall = max(p[2] for p in parts)
    return {"requests": len(lat), "errors": len(lat) - ok, "achieved_rps": round(len(lat) / wall, 1),
            **_percentiles(lat), "client_cpu_s": round(sum(p[3] for p in parts), 2), "client_wall_s": round(wall, 2)}


class Client:
    def __init__(self, kind: str, processes: int) -> None:
        if kind == "auto":
            kind = "hey" if shutil.which("hey") else "python"
        if kind == "hey" and not shutil.which("hey"):
            raise SystemExit(f"serving_bench: hey is not installed (apt-get install hey={HEY_PIN}), or use "
                             f"--client python")
        self.kind, self.processes = kind, processes

    @property
    def name(self) -> str:
        return f"hey {HEY_PIN}" if self.kind == "hey" else f"python x{self.processes} processes"

    def phase(self, url: str, duration: float, rate: Optional[float], concurrency: int) -> Dict:
        if self.kind == "hey":
            return hey_phase(url, duration, rate, concurrency)
        return python_phase(url, duration, rate, concurrency, self.processes)


# the server ----------------------------------------------------------------------------------------

def start_server(model_dir: str, search: str, extra: List[str]) -> tuple:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "entrypoints.serve", "--model-dir", model_dir, "--host",
                             "127.0.0.1", "--port", str(port), "--num-threads", "1", "--log-level", "warning",
                             "--search", search, *extra], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/ping", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.5)


def measure(client: Client, model_dir: str, search: str, args, extra: List[str], rates: List[float],
            saturate: bool, log) -> Dict:
    proc, url = start_server(model_dir, search, extra)
    inv = url + "/invocations"
    try:
        client.phase(inv, min(2.0, args.duration), None, 4)  # warm-up
        cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
        result: Dict = {"rates": {}}
        if saturate:
            result["saturation"] = client.phase(inv, args.duration, None, args.concurrency)
            log(f"  saturation: {result['saturation']}")
        for rate in rates:
            result["rates"][str(int(rate))] = client.phase(inv, args.duration, rate, args.concurrency)
            log(f"  {rate:g} req/s: {result['rates'][str(int(rate))]}")
        result["server_cpu_s"] = round(_cpu_seconds(proc.pid) - cpu0, 2)
        result["measured_wall_s"] = round(time.perf_counter() - t0, 2)
        result["ping"] = httpx.get(url + "/ping", timeout=5).json()
    finally:
        proc.terminate()
        proc.wait(60)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[3706, 62000, 1_000_000],
                        help="catalogue sizes (10000000 works with ~16 GB of memory)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 500, 1000], help="fixed rates (req/s)")
    parser.add_argument("--latency-rate", type=float, default=500, help="the rate whose p50/p99 head the JSON line")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at saturation")
    parser.add_argument("--exact-max-items", type=int, default=100_000,
                        help="catalogues up to this size are searched exactly, larger ones through --index")
    parser.add_argument("--index", default="ivf-int8",
                        help="index for the larger catalogues (ivf-int8, ivf, hnsw, hnsw-int8, ...)")
    parser.add_argument("--index-param", action="append", default=[], metavar="NAME=INT",
                        help="index parameter (repeatable), e.g. efSearch=64")
    parser.add_argument("--shadow-items", type=int, nargs="*", default=None,
                        help="catalogues also run with a shadow variant mirrored at 100%% (default: the smallest)")
    parser.add_argument("--shadow-rate", type=float, default=200, help="rate of the shadow comparison (req/s)")
    parser.add_argument("--client", default="auto", choices=("auto", "hey", "python"),
                        help="load generator: hey if installed, else processes of the Python one")
    parser.add_argument("--client-processes", type=int, default=2, help="processes of the Python load generator")
    parser.add_argument("--work-dir", help="keep the exports (and indexes) here and reuse them (default: a temporary "
                                           "directory)")
    parser.add_argument("--json", help="append one JSON line per configuration to this file")
    args = parser.parse_args(argv)
    from twotower_lit.export.index import parse_params

    index_params = parse_params(args.index_param)
    client = Client(args.client, args.client_processes)
    shadow_items = [min(args.items)] if args.shadow_items is None else args.shadow_items

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = []
    tmp = None if args.work_dir else tempfile.TemporaryDirectory()
    root = args.work_dir or tmp.name
    os.makedirs(root, exist_ok=True)
    try:
        for items in args.items:
            search = "exact" if items <= args.exact_max_items else args.index
            entry = prepare_export(root, items, search, index_params, log)
            model_dir = os.path.join(root, f"items-{items}")
            configs = [(False, [])]
            if items in shadow_items:
                shadow_dir = os.path.join(root, f"shadow-{items}")
                if not os.path.exists(os.path.join(shadow_dir, "manifest.json")):
                    from twotower_lit.serving.synthetic import random_export

                    random_export(shadow_dir, num_users=USERS, num_items=items, embedding_dim=32,
                                  user_layers=(128, 64), seen_per_user=100, seed=1)
                configs.append((True, ["--shadow-model-dir", shadow_dir, "--shadow-sampling-percent", "100"]))
            for shadow, extra in configs:
                log(f"{items} items, search {search}, shadow {shadow}, client {client.name}")
                rates = [args.shadow_rate] if shadow else \
                    sorted(set(args.rates) | {args.latency_rate, args.shadow_rate})
                result = measure(client, model_dir, search, args, extra, rates, not shadow, log)
                head = result["rates"].get(str(int(args.shadow_rate if shadow else args.latency_rate)), {})
                phases = list(result["rates"].values()) + ([result["saturation"]] if "saturation" in result else [])
                client_cpu = sum(p["client_cpu_s"] for p in phases)
                row = {"items": items, "search": search, "shadow": shadow,
                       "rps": result["saturation"]["achieved_rps"] if "saturation" in result else None,
                       "p50_ms": head.get("p50_ms"), "p99_ms": head.get("p99_ms"),
                       "latency_rate": args.shadow_rate if shadow else args.latency_rate,
                       "recall_at_10": entry["recall_at_10"], "index": entry.get("name"),
                       "index_bytes": entry.get("bytes", 0), "index_build_s": entry.get("build_s", 0.0),
                       "index_params": entry.get("params", {}), "saturation": result.get("saturation"),
                       "rates": result["rates"], "client": client.name,
                       "client_cpu_pct": round(100 * client_cpu / result["measured_wall_s"], 1),
                       "server_cpu_pct": round(100 * result["server_cpu_s"] / result["measured_wall_s"], 1),
                       "batching": result["ping"].get("batching"), "duration_s": args.duration,
                       "machine": _machine(), "load_avg": [round(x, 2) for x in os.getloadavg()],
                       "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                if shadow:  # production's p99 with the shadow over its p99 alone, at the same rate
                    alone = next(r for r in rows if r["items"] == items and not r["shadow"])
                    base = alone["rates"].get(str(int(args.shadow_rate)), {}).get("p99_ms")
                    row["p99_ratio_vs_no_shadow"] = round(row["p99_ms"] / base, 3) if base else None
                rows.append(row)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_table(rows)


def print_table(rows: List[Dict]) -> None:
    if not rows:
        return
    print(f"\nserver: 1 worker, 1 torch thread, micro-batching; client {rows[0]['client']} on the same "
          f"{rows[0]['machine']['cpus']} cores ({rows[0]['machine']['cpu']}); load average at the end "
          f"{', '.join(str(x) for x in rows[-1]['load_avg'])}")
    rates = sorted({r for row in rows for r in row["rates"]}, key=float)
    head = (f"{'items':>8} {'search':>9} {'shadow':>6} {'recall@10':>9} | {'sat. req/s':>10} | "
            + " | ".join(f"{r + '/s p50 p99 ms':>18}" for r in rates) + f" | {'client CPU':>10} {'server CPU':>10}")
    print(head)
    print("-" * len(head))
    for row in rows:
        cells = []
        for r in rates:
            x = row["rates"].get(r)
            cells.append(f"{x['p50_ms']:>8.2f} {x['p99_ms']:>9.2f}" if x else f"{'':>18}")
        rps = f"{row['rps']:>10.0f}" if row["rps"] is not None else f"{'':>10}"
        print(f"{row['items']:>8} {row['search']:>9} {str(row['shadow']):>6} {row['recall_at_10']:>9.4f} | {rps} | "
              + " | ".join(cells) + f" | {row['client_cpu_pct']:>9.0f}% {row['server_cpu_pct']:>9.0f}%")


if __name__ == "__main__":
    main()
