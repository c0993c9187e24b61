"""The shadow variant: its own process, fed copies of production requests, never answering callers.

`ShadowProcess` runs the shadow model as a second server on a Unix socket (as SageMaker runs a
shadow variant on its own instances), so a shadow that crashes, hangs or burns CPU threads cannot
take the production process with it; it is restarted with back-off when it dies, and one that
cannot start (a corrupt model, say) does not keep production from starting and serving.
`ShadowMirror` lives in the production process: after production has answered, it sends a copy of
the request to the shadow asynchronously, bounded in time (`shadow_timeout`) and in number
(`shadow_max_in_flight`; beyond that a request is not mirrored), and writes the shadow's response,
or its failure, to data capture under the production request's event id. It also asks the
shadow's ``/ping`` every second, for production's ``/ping`` to show the shadow's state.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import h11
import httpx

from twotower_lit.config import ServeConfig
from twotower_lit.serving.options import ServingConfig

log = logging.getLogger(__name__)

MODEL_LATENCY_HEADER = "X-Model-Latency-Ms"
INFERENCE_ID_HEADER = "X-Amzn-SageMaker-Inference-Id"


@dataclass
class ShadowResult:
    """A mirrored call's outcome: status 0 means no HTTP answer (see `error`)."""

    status: int
    body: bytes
    content_type: str
    latency_ms: float
    model_latency_ms: Optional[float]
    model_version: Optional[str]
    error: Optional[str]


OnResult = Callable[[ShadowResult], None]

HEALTH_INTERVAL = 1.0  # seconds between two looks at the shadow's /ping


def supervisor_status_path(target: str) -> Optional[str]:
    """Where `ShadowProcess` writes its child's state, for a ``unix:`` target it started."""
    if not target.startswith("unix:"):
        return None
    return os.path.join(os.path.dirname(target[len("unix:"):]), "status.json")


def _latin1(value: str) -> bytes:
    # Starlette decodes header values as latin-1, so this gives back the bytes the client sent;
    # httpx would encode a str as ASCII and fail on anything else.
    return value.encode("latin-1")


class _MirrorConnections:
    """Keep-alive HTTP/1.1 connections to the shadow, spoken through h11 (the HTTP parser the server
    itself runs on) over asyncio streams: a mirrored call costs production's event loop a fraction of
    what a general-purpose client's call does, which matters when every request is mirrored."""

    def __init__(self, target: str) -> None:
        if target.startswith("unix:"):
            self.uds, self.host, self.port, self.authority = target[len("unix:"):], None, None, "shadow"
        else:
            url = httpx.URL(target)
            self.uds, self.host, self.port = None, url.host, url.port or 80
            self.authority = f"{self.host}:{self.port}"
        self.idle: list = []

    async def _open(self):
        if self.uds:
            reader, writer = await asyncio.open_unix_connection(self.uds)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer, h11.Connection(h11.CLIENT)

    async def post(self, path: str, body: bytes, headers: Dict[str, bytes]):
        """(status, {lower-case name: value}, body) of one POST; raises OSError or h11's errors."""
        conn = self.idle.pop() if self.idle else await self._open()
        reader, writer, http = conn
        close = True
        try:
            head = [("Host", self.authority), ("Content-Length", str(len(body)))] + list(headers.items())
            writer.write(http.send(h11.Request(method="POST", target=path, headers=head))
                         + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage()))
            await writer.drain()
            status, response_headers, parts = 0, {}, []
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    http.receive_data(data)
                    if not data and http.their_state is not h11.DONE:
                        raise ConnectionError("the shadow closed the connection")
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("the shadow closed the connection")
            if http.our_state is h11.DONE and http.their_state is h11.DONE:
                http.start_next_cycle()
                self.idle.append(conn)
                close = False
            return status, response_headers, b"".join(parts)
        finally:
            if close:  # not handed back: failed, cancelled or the shadow closes it
                writer.close()

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


class ShadowMirror:
    """Mirrors requests to a shadow server (``unix:/path.sock`` or ``http://host:port``)."""

    def __init__(self, target: str, cfg: ServeConfig) -> None:
        self.cfg = cfg
        if target.startswith("unix:"):
            transport = httpx.AsyncHTTPTransport(uds=target[len("unix:"):])
            self.url = "http://shadow/invocations"
        else:
            transport = httpx.AsyncHTTPTransport()
            self.url = target.rstrip("/") + "/invocations"
        self.connections = _MirrorConnections(target)
        self.path = httpx.URL(self.url).path
        limits = httpx.Limits(max_connections=cfg.shadow_max_in_flight,
                              max_keepalive_connections=cfg.shadow_max_in_flight)
        self.client = httpx.AsyncClient(transport=transport, limits=limits, timeout=cfg.shadow_timeout)
        self.ping_url = self.url[:-len("/invocations")] + "/ping"
        self.status_path = supervisor_status_path(target)
        self.tasks: set = set()
        self.sent = self.skipped = self.failed = 0
        self.health: Dict = {"status": "starting"}
        self._health_task: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Start watching the shadow's health (call from the running event loop)."""
        self._health_task = asyncio.get_running_loop().create_task(self._watch_health())

    def status(self) -> Dict:
        """The shadow's state for production's /ping: healthy (with its model version), or why not."""
        return {"variant": self.cfg.shadow_variant_name, **self.health}

    async def _watch_health(self) -> None:
        while True:
            self.health = await self._probe()
            await asyncio.sleep(HEALTH_INTERVAL)

    async def _probe(self) -> Dict:
        try:
            r = await self.client.get(self.ping_url, timeout=HEALTH_INTERVAL)
            if r.status_code == 200:
                return {"status": "healthy", "model_version": r.json().get("model_version")}
            error = f"its /ping answered {r.status_code}"
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            error = f"no answer to /ping ({type(e).__name__})"
        supervisor = self._supervisor_message()
        return {"status": "unavailable", "error": f"{supervisor}; {error}" if supervisor else error}

    def _supervisor_message(self) -> Optional[str]:
        if self.status_path is None:
            return None
        try:
            with open(self.status_path, encoding="utf-8") as f:
                return json.load(f).get("message")
        except (OSError, ValueError, AttributeError):
            return None

    def sampled(self) -> bool:
        return random.random() * 100.0 < self.cfg.shadow_sampling_percent

    def submit(self, body: bytes, content_type: Optional[str], accept: Optional[str], inference_id: str,
               on_result: OnResult) -> bool:
        """Start a mirrored call in the background; False when over the in-flight bound."""
        if len(self.tasks) >= self.cfg.shadow_max_in_flight:
            # recorded as a failure: a shadow too slow to keep up with the traffic is a finding
            self.skipped += 1
            on_result(ShadowResult(0, b"", "", 0.0, None, None,
                                   f"not mirrored: {len(self.tasks)} shadow calls in flight (shadow_max_in_flight)"))
            return False
        self.sent += 1
        task = asyncio.get_running_loop().create_task(self._call(body, content_type, accept, inference_id, on_result))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _call(self, body: bytes, content_type: Optional[str], accept: Optional[str], inference_id: str,
                    on_result: OnResult) -> None:
        headers = {INFERENCE_ID_HEADER: _latin1(inference_id)}
        if content_type:
            headers["Content-Type"] = _latin1(content_type)
        if accept:
            headers["Accept"] = _latin1(accept)
        t0 = time.perf_counter()
        try:
            status, got, content = await asyncio.wait_for(self.connections.post(self.path, body, headers),
                                                          self.cfg.shadow_timeout)
            model_ms = got.get(MODEL_LATENCY_HEADER.lower())
            result = ShadowResult(status, content, got.get("content-type", ""),
                                  (time.perf_counter() - t0) * 1000, float(model_ms) if model_ms else None,
                                  got.get("x-model-version"), None if status < 500 else "server error")
        except asyncio.TimeoutError:
            result = self._failure(t0, f"timeout after {self.cfg.shadow_timeout} s")
        except (OSError, h11.ProtocolError) as e:
            unavailable = self.health.get("error") if self.health.get("status") == "unavailable" else None
            error = f"{type(e).__name__}: {e}"[:300]
            result = self._failure(t0, f"shadow unavailable: {unavailable} ({error})" if unavailable else error)
        except asyncio.CancelledError:
            result = self._failure(t0, "cancelled at shutdown")
            on_result(result)
            raise
        except Exception as e:  # whatever went wrong, the shadow's record must still be written
            log.exception("shadow call failed")
            result = self._failure(t0, f"{type(e).__name__}: {e}"[:300])
        if result.status == 0 or result.status >= 500:
            self.failed += 1
        try:
            on_result(result)
        except Exception:
            log.exception("shadow result handler failed")

    def _failure(self, t0: float, error: str) -> ShadowResult:
        return ShadowResult(0, b"", "", (time.perf_counter() - t0) * 1000, None, None, error)

    async def close(self, timeout: float) -> None:
        """Let in-flight calls finish (at most `timeout` s; the rest are cancelled and recorded)."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self.tasks:
            done, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self.client.aclose()
        self.connections.close()
        log.info("shadow mirror: %d sent, %d failed, %d not mirrored (over the in-flight bound)",
                 self.sent, self.failed, self.skipped)


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's stop() still ends the child
        pass


class ShadowProcess:
    """The shadow model's server as a supervised child process on a Unix socket."""

    def __init__(self, cfg: ServeConfig, startup_timeout: float = 120.0) -> None:
        self.cfg = cfg
        self.startup_timeout = startup_timeout
        self.socket = os.path.join(tempfile.mkdtemp(prefix="twotower-shadow-"), "shadow.sock")
        self.proc: Optional[subprocess.Popen] = None
        self._stopping = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._reported: Optional[subprocess.Popen] = None  # the child whose exit was last logged
        self.restarts = 0

    @property
    def target(self) -> str:
        return "unix:" + self.socket

    def _status(self, state: str, message: Optional[str] = None) -> None:
        """Tell the production workers (`ShadowMirror`) what happened to the child."""
        path = supervisor_status_path(self.target)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"state": state, "message": message, "restarts": self.restarts}, f)
            os.replace(tmp, path)
        except OSError:
            log.exception("could not write the shadow supervisor's status to %s", path)

    def command(self) -> list:
        c = self.cfg
        args = {"model-dir": c.shadow_model_dir, "uds": self.socket, "variant-name": c.shadow_variant_name,
                "endpoint-name": c.endpoint_name, "num-threads": c.num_threads, "search": c.search,
                "max-concurrency": c.max_concurrency, "request-timeout": c.request_timeout,
                "body-timeout": c.body_timeout, "header-timeout": c.header_timeout,
                "max-body-bytes": c.max_body_bytes, "max-batch": c.max_batch, "max-k": c.max_k,
                "default-k": c.default_k, "graceful-timeout": min(c.graceful_timeout, 1.0), "log-level": c.log_level,
                "batch-max-requests": getattr(c, "batch_max_requests", ServingConfig.batch_max_requests),
                "batch-max-wait-ms": getattr(c, "batch_max_wait_ms", ServingConfig.batch_max_wait_ms)}
        cmd = [sys.executable, "-m", "twotower_lit.serving.server"]
        for key, value in args.items():
            cmd += [f"--{key}", str(value)]
        return cmd

    def _spawn(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        # its own session: a Ctrl+C or a group-wide SIGTERM reaches production only, which drains
        # its shadow calls before it stops the child; the child dies with its parent all the same
        self.proc = subprocess.Popen(self.command(), start_new_session=True, preexec_fn=_die_with_parent)
        self._status("starting")

    def start(self) -> "ShadowProcess":
        """Start the child and wait (at most `startup_timeout`) until it answers /ping. A shadow that
        exits or does not answer is logged and left to the supervisor: production starts all the same."""
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), timeout=2.0) as client:
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if client.get("http://shadow/ping").status_code == 200:
                        self._status("running")
                        log.info("shadow variant %r (%s) ready on %s", self.cfg.shadow_variant_name,
                                 self.cfg.shadow_model_dir, self.socket)
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            else:
                if self.proc.poll() is None:
                    message = (f"the shadow server ({self.cfg.shadow_model_dir}) did not answer /ping within "
                               f"{self.startup_timeout:g} s")
                    log.error("%s; production serves without it until it does", message)
                    self._status("starting", message)
        self._watcher = threading.Thread(target=self._watch, name="shadow-watch", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.wait(0.5):
            if self.proc is None or self.proc.poll() is None:
                continue
            message = (f"the shadow server ({self.cfg.shadow_model_dir}) exited with code {self.proc.returncode}; "
                       f"restart {self.restarts + 1} in {backoff:.0f} s (its log says why)")
            log.error("%s; production is not affected", message)
            self._status("exited", message)
            self._reported = self.proc
            if self._stopping.wait(backoff):
                return
            started = time.monotonic()
            self._spawn()
            self.restarts += 1
            while not self._stopping.wait(0.5) and self.proc.poll() is None and time.monotonic() - started < 60:
                pass
            backoff = 1.0 if self.proc.poll() is None else min(backoff * 2, 60.0)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.proc is not None and self.proc.poll() is not None and self.proc is not self._reported:
            # it died between two looks of the watcher (every 0.5 s) and the shutdown: still say so
            log.error("the shadow server exited with code %s (found at shutdown)", self.proc.returncode)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for path in (self.socket, supervisor_status_path(self.target)):
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            os.rmdir(os.path.dirname(self.socket))
        except OSError:
            pass
