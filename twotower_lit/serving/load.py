"""Traffic generator: replays users against an endpoint at a rate and concurrency, reports
achieved rate and latency percentiles.

The sender is pluggable: any ``async (body, content_type) -> Outcome``. `http_sender` posts to a
URL; `sync_sender` wraps a blocking call, e.g. SageMaker's runtime::

    runtime = boto3.client("sagemaker-runtime")
    send = sync_sender(lambda body, ct: runtime.invoke_endpoint(
        EndpointName=name, Body=body, ContentType=ct)["ResponseMetadata"]["HTTPStatusCode"])
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from twotower_lit.config import LoadConfig
from twotower_lit.serving.shadow import MODEL_LATENCY_HEADER


@dataclass
class Outcome:
    """One request's result: status 0 when no HTTP status came back (see `error`)."""

    status: int
    latency_s: float
    error: Optional[str] = None
    server_ms: Optional[float] = None  # the endpoint's own compute time, when it reports one


Sender = Callable[[bytes, str], Awaitable[Outcome]]


def http_sender(url: str, timeout: float = 10.0,
                max_connections: int = 64) -> Tuple[Sender, Callable[[], Awaitable[None]]]:
    """(sender, close) posting to `url` over keep-alive connections.

    One client per connection, handed out through a queue: a single httpx client shared by many
    concurrent requests spends more time in its pool's bookkeeping than on the wire (measured
    here: 3x fewer requests per second at 16 in flight)."""
    import httpx

    clients = [httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
               for _ in range(max_connections)]
    free: "asyncio.Queue" = asyncio.Queue()
    for c in clients:
        free.put_nowait(c)

    async def send(body: bytes, content_type: str) -> Outcome:
        client = await free.get()
        t0 = time.perf_counter()
        try:
            r = await client.post(url, content=body, headers={"Content-Type": content_type})
            server_ms = r.headers.get(MODEL_LATENCY_HEADER)
            return Outcome(r.status_code, time.perf_counter() - t0, None, float(server_ms) if server_ms else None)
        except httpx.HTTPError as e:
            return Outcome(0, time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:200])
        finally:
            free.put_nowait(client)

    async def close() -> None:
        for c in clients:
            await c.aclose()

    return send, close


def sync_sender(call: Callable[[bytes, str], int]) -> Sender:
    """A sender from a blocking ``call(body, content_type) -> HTTP status`` (run in a thread). An
    exception carrying a botocore-style ``response`` counts with that response's status."""

    async def send(body: bytes, content_type: str) -> Outcome:
        t0 = time.perf_counter()
        try:
            status = await asyncio.to_thread(call, body, content_type)
            return Outcome(int(status), time.perf_counter() - t0)
        except Exception as e:
            meta = getattr(e, "response", None) or {}
            status = meta.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if isinstance(meta, dict) else 0
            return Outcome(int(status), time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:200])

    return send


# users to replay -------------------------------------------------------------------------------

def split_user_indices(data_dir: str, split: str = "test") -> np.ndarray:
    """User indices (as in the prepared tables and the export) with rows in a prepared split
    (manifest.json lists its shards)."""
    import pyarrow.parquet as pq

    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    shards = sorted(p for p in manifest.get("files", {}) if p.startswith(f"{split}/"))
    if not shards:
        raise ValueError(f"{data_dir}/manifest.json lists no {split}/ shards")
    return np.unique(np.concatenate([pq.read_table(os.path.join(data_dir, p), columns=["user"]).column("user")
                                     .to_numpy() for p in shards]))


def split_user_ids(data_dir: str, split: str = "test") -> np.ndarray:
    """Raw ids of the users with rows in a prepared split."""
    import pyarrow.parquet as pq

    users = split_user_indices(data_dir, split)
    table = pq.read_table(os.path.join(data_dir, "users.parquet"), columns=["user", "user_id"])
    raw = dict(zip(table.column("user").to_pylist(), table.column("user_id").to_pylist()))
    return np.asarray([raw[int(u)] for u in users if int(u) in raw], dtype=np.int64)


def parse_user_ids(spec: str) -> np.ndarray:
    """'1,2,3' or '@file' (ids separated by newlines, commas or spaces)."""
    text = open(spec[1:]).read() if spec.startswith("@") else spec
    try:
        return np.asarray([int(t) for t in text.replace(",", " ").split()], dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"user ids must be integers: {e}") from None


def payloads(user_ids: Sequence[int], batch: int, k: int, seed: int) -> Iterator[bytes]:
    """Endless JSON bodies over a shuffled, repeating order of `user_ids`."""
    if len(user_ids) == 0:
        raise ValueError("no users to replay")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(np.asarray(user_ids))
        for lo in range(0, len(order), batch):
            ids = [int(u) for u in order[lo:lo + batch]]
            body = {"user_id": ids[0], "k": k} if batch == 1 else {"inputs": ids, "k": k}
            yield json.dumps(body).encode()


# the run ---------------------------------------------------------------------------------------

@dataclass
class LoadResult:
    outcomes: List[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> Dict:
        lat = np.asarray([o.latency_s for o in self.outcomes]) * 1000
        statuses: Dict[str, int] = {}
        for o in self.outcomes:
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        ok = sum(1 for o in self.outcomes if 200 <= o.status < 300)
        pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
        server = np.asarray([o.server_ms for o in self.outcomes if o.server_ms is not None])
        samples = sorted({o.error for o in self.outcomes if o.error})[:3]
        return {"server_ms": {"p50": float(np.percentile(server, 50)), "p99": float(np.percentile(server, 99))}
                if len(server) else None, "error_samples": samples,
                "requests": len(self.outcomes), "ok": ok, "errors": len(self.outcomes) - ok, "statuses": statuses,
                "wall_s": round(self.wall_s, 3),
                "achieved_rps": round(len(self.outcomes) / self.wall_s, 2) if self.wall_s else 0.0,
                "latency_ms": {"mean": float(lat.mean()) if len(lat) else float("nan"), "p50": pct(50), "p90": pct(90),
                               "p99": pct(99), "max": float(lat.max()) if len(lat) else float("nan")}}


async def run_load(send: Sender, bodies: Iterator[bytes], rate: float, concurrency: int, max_requests: int,
                   duration: float, content_type: str = "application/json", seed: int = 0) -> LoadResult:
    """Open-loop load: Poisson arrivals at `rate` per second (0: back to back), at most
    `concurrency` in flight (arrivals wait for a slot), until `max_requests` or `duration`."""
    rng = np.random.default_rng(seed)
    slots = asyncio.Semaphore(concurrency)
    result = LoadResult()
    tasks = set()
    t0 = time.perf_counter()
    next_at = t0

    async def one(body: bytes) -> None:
        try:
            result.outcomes.append(await send(body, content_type))
        finally:
            slots.release()

    for n, body in enumerate(bodies):
        if n >= max_requests or time.perf_counter() - t0 >= duration:
            break
        if rate > 0:
            next_at += rng.exponential(1.0 / rate)
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(one(body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    result.wall_s = time.perf_counter() - t0
    return result


def format_summary(s: Dict) -> str:
    lat = s["latency_ms"]
    text = (f"{s['requests']} requests in {s['wall_s']:.1f} s = {s['achieved_rps']:.1f} req/s; "
            f"{s['errors']} errors {s['statuses']}\n"
            f"latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}")
    if s.get("error_samples"):
        text += "\nerrors like: " + " | ".join(s["error_samples"])
    return text


def run(cfg: LoadConfig, send: Optional[Sender] = None) -> Dict:
    """Run the load described by `cfg` (against ``cfg.url`` unless a sender is given)."""
    if cfg.user_ids:
        users = parse_user_ids(cfg.user_ids)
    elif cfg.data_dir:
        users = split_user_ids(cfg.data_dir, cfg.split)
    else:
        raise ValueError("give --data-dir (a prepared data directory) or --user-ids")

    async def main() -> LoadResult:
        close = None
        sender = send
        if sender is None:
            sender, close = http_sender(cfg.url, cfg.timeout, max(cfg.concurrency, 1))
        try:
            return await run_load(sender, payloads(users, cfg.batch, cfg.k, cfg.seed), cfg.rate, cfg.concurrency,
                                  cfg.requests, cfg.duration, seed=cfg.seed)
        finally:
            if close is not None:
                await close()

    summary = asyncio.run(main()).summary()
    summary["users"] = int(len(users))
    if cfg.output:
        with open(cfg.output, "w") as f:
            json.dump(summary, f, indent=1)
    return summary
