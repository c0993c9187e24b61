"""The ASGI app with SageMaker's container contract: ``GET /ping``, ``POST /invocations``.

An invocation reads the body (at most ``max_body_bytes``, within ``body_timeout``; a slow client
holds no compute slot while it sends), then joins a micro-batch: the requests waiting when the
model is free (at most ``batch_max_requests``; the first waits at most ``batch_max_wait_ms`` for
others) are decoded, scored together (one user-tower pass and one top-k search,
`Recommender.recommend_many`, each request with its own k and seen-item exclusion) and encoded in
a worker thread, one batch at a time per process (the model computes with ``num_threads`` torch
threads; more processes = ``workers``). Each request gets its answer within ``request_timeout``
(or a 504); at most ``max_concurrency`` requests wait for or hold the model. Client
errors are 4xx with a JSON body naming the field; only a failure of the server itself is a 5xx.
After the response is ready, the request is mirrored to the shadow variant (if any) in the
background, and both variants' records go to data capture (if enabled). ``/ping`` answers for
production alone and shows the shadow's state in its body.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import threading
import time
from typing import List, Optional, Tuple

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from twotower_lit.config import ServeConfig
from twotower_lit.serving import handler
from twotower_lit.serving.capture import CaptureWriter, capture_record, new_event_id, utc_now
from twotower_lit.serving.errors import RequestError
from twotower_lit.serving.options import ServingConfig
from twotower_lit.serving.request import JSON, negotiate
from twotower_lit.serving.shadow import INFERENCE_ID_HEADER, MODEL_LATENCY_HEADER, ShadowMirror, ShadowResult

log = logging.getLogger(__name__)

# One model computation (a micro-batch) at a time per process: torch's intra-op threads
# (num_threads) are the parallelism inside it; more at once would only oversubscribe the cores.
COMPUTE_SLOTS = 1


@dataclasses.dataclass
class _Job:
    """One invocation waiting in, or scored by, a micro-batch."""

    body: bytes
    content_type: Optional[str]
    accept: Optional[str]
    future: "asyncio.Future"  # (status, body, content type); cancelled when the request gave up


def _error(status: int, field: str, message: str) -> Tuple[int, bytes, str]:
    return status, RequestError(status, field, message).body(), JSON


class InferenceService:
    """State of one server process: the model, the shadow mirror, the capture writer."""

    def __init__(self, cfg: ServeConfig) -> None:
        if not isinstance(cfg, ServingConfig):
            cfg = ServingConfig(**dataclasses.asdict(cfg))
        self.cfg = cfg
        self.model: Optional[handler.ServingModel] = None
        self.mirror: Optional[ShadowMirror] = None
        self.capture: Optional[CaptureWriter] = None
        self.limiter = anyio.CapacityLimiter(COMPUTE_SLOTS)
        self.in_flight = 0
        self.rejected_bodies = 0  # answered 408/413/400 before the body was whole: captured by neither variant
        self.computing = 0  # pipeline calls running in threads, abandoned ones included
        self._computing_lock = threading.Lock()
        self.queue: List[_Job] = []
        self._wake: Optional[asyncio.Event] = None
        self._batcher: Optional[asyncio.Task] = None
        self.batch_max = cfg.batch_max_requests
        self.batches = self.batched_requests = 0

    # lifecycle -----------------------------------------------------------------------------
    async def startup(self) -> None:
        self.model = await anyio.to_thread.run_sync(handler.load_model, self.cfg.model_dir, self.cfg)
        if self.model.fault:  # an injected fault acts per invocation, as it always did
            self.batch_max = 1
        self._wake = asyncio.Event()
        self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())
        if self.cfg.capture_dir:
            self.capture = CaptureWriter(self.cfg.capture_dir, self.cfg.endpoint_name)
        if self.cfg.shadow_url:
            self.mirror = ShadowMirror(self.cfg.shadow_url, self.cfg)
            self.mirror.start()

    async def shutdown(self) -> None:
        if self._batcher is not None:  # uvicorn has answered every request by now
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        log.info("micro-batching: %d requests in %d batches; search %s", self.batched_requests, self.batches,
                 self.model.recommender.search.describe() if self.model else None)
        if self.mirror is not None:
            await self.mirror.close(timeout=self.cfg.shadow_timeout + 1.0)
        if self.capture is not None:
            await anyio.to_thread.run_sync(self.capture.close)
            log.info("data capture: %d records written under %s", self.capture.written, self.cfg.capture_dir)
        if self.rejected_bodies:
            log.info("%d requests answered before their body was whole (too large, too slow or the client gone); "
                     "captured by neither variant", self.rejected_bodies)

    # endpoints -----------------------------------------------------------------------------
    async def ping(self, request: Request) -> Response:
        if self.model is None:
            return Response(b'{"status":"loading"}', 503, media_type=JSON)
        status = {"status": "healthy", "model_version": self.model.model_version,
                  "search": self.model.recommender.search.describe(),
                  "batching": {"max_requests": self.batch_max, "max_wait_ms": self.cfg.batch_max_wait_ms,
                               "batches": self.batches, "requests": self.batched_requests}}
        if self.mirror is not None:  # for whoever watches the shadow test; production is healthy either way
            status["shadow"] = self.mirror.status()
        return Response(json.dumps(status), 200, media_type=JSON)

    async def invocations(self, request: Request) -> Response:
        t0 = time.perf_counter()
        when = utc_now()
        event_id = new_event_id()
        inference_id = request.headers.get(INFERENCE_ID_HEADER) or event_id
        content_type = request.headers.get("content-type")
        accept = request.headers.get("accept")
        headers = {INFERENCE_ID_HEADER: inference_id}
        try:
            body = await self._read_body(request)
        except RequestError as e:
            # Answered as SageMaker's front end answers a body it cannot take: the request reaches
            # neither variant, so neither captures it; the unread rest ends the connection.
            self.rejected_bodies += 1
            return Response(e.body(), e.status, headers={**headers, "Connection": "close"}, media_type=JSON)
        model_ms: Optional[float] = None
        if self.in_flight >= self.cfg.max_concurrency:
            status, out, out_type = _error(503, "server", f"over {self.cfg.max_concurrency} requests in flight; retry")
        else:
            self.in_flight += 1
            try:
                status, out, out_type, model_ms = await self._run(body, content_type, accept)
            except RequestError as e:
                status, out, out_type = e.status, e.body(), JSON
            finally:
                self.in_flight -= 1
        latency_ms = (time.perf_counter() - t0) * 1000
        capture = self.capture is not None and random.random() * 100.0 < self.cfg.capture_sampling_percent
        if capture:
            self._capture(self.cfg.variant_name, "production", event_id, inference_id, when, body,
                          content_type, out, out_type, status, latency_ms, model_ms,
                          self.model.model_version if self.model else None, None)
        if self.mirror is not None and self.mirror.sampled():
            self.mirror.submit(body, content_type, accept, inference_id,
                               lambda r: capture and self._capture_shadow(r, event_id, inference_id, when, body,
                                                                         content_type))
        if model_ms is not None:
            headers[MODEL_LATENCY_HEADER] = f"{model_ms:.3f}"
        if self.model is not None:
            headers["X-Model-Version"] = self.model.model_version
        return Response(out, status, headers=headers, media_type=out_type)

    # internals -----------------------------------------------------------------------------
    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "body", f"Content-Length {declared} is over the limit of {limit} bytes")
        chunks, size = [], 0
        try:  # a client trickling its body is bounded on its own, apart from the model's time
            with anyio.fail_after(self.cfg.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(413, "body", f"over the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(408, "body", f"not received within {self.cfg.body_timeout:g} s") from None
        except ClientDisconnect:
            raise RequestError(400, "body", "the client disconnected while sending the body") from None
        return b"".join(chunks)

    async def _run(self, body: bytes, content_type: Optional[str], accept: Optional[str]):
        if self.model is None:
            return (*_error(503, "server", "the model is still loading"), None)
        negotiate(accept)  # 406 before any work
        job = _Job(body, content_type, accept, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self._wake.set()
        try:
            with anyio.fail_after(self.cfg.request_timeout):
                return await job.future  # cancelled on timeout: a batch not yet started skips it
        except TimeoutError:
            return (*_error(504, "server", f"no answer within {self.cfg.request_timeout} s"), None)

    async def _batch_loop(self) -> None:
        """Forms the micro-batches: waits for a request, gives others up to ``batch_max_wait_ms``
        to join, scores up to ``batch_max_requests`` of the waiting ones in a worker thread, hands
        out the answers; requests that arrive meanwhile form the next batch."""
        wait = self.cfg.batch_max_wait_ms / 1000.0
        while True:
            await self._wake.wait()
            if len(self.queue) < self.batch_max:
                await asyncio.sleep(wait)
            batch = [job for job in self.queue[:self.batch_max] if not job.future.done()]
            del self.queue[:self.batch_max]
            if not self.queue:
                self._wake.clear()
            if not batch:
                continue
            self.batches += 1
            self.batched_requests += len(batch)
            try:
                answers = await anyio.to_thread.run_sync(self._compute, batch, limiter=self.limiter,
                                                         abandon_on_cancel=True)
            except Exception:
                log.exception("invocation failed")
                answers = [(*_error(500, "server", "internal error while serving the request; see the server log"),
                            None)] * len(batch)
            for job, answer in zip(batch, answers):
                if not job.future.done():
                    job.future.set_result(answer)

    def _compute(self, batch: List[_Job]) -> list:
        """(status, body, content type, model ms) per job: decode each, score the valid ones
        together, encode each; a client error stays with its own request."""
        model = self.model
        with self._computing_lock:
            self.computing += 1
        try:
            t = time.perf_counter()
            answers: list = [None] * len(batch)
            decoded = []
            for i, job in enumerate(batch):
                try:
                    decoded.append((i, handler.decode(job.body, job.content_type, model.config)))
                except RequestError as e:
                    answers[i] = (e.status, e.body(), JSON, None)
            payloads = handler.predict_batch([request for _, request in decoded], model) if decoded else []
            encoded = []
            for (i, _), payload in zip(decoded, payloads):
                try:
                    encoded.append((i, *handler.encode(payload, batch[i].accept)))
                except RequestError as e:
                    answers[i] = (e.status, e.body(), JSON, None)
            model_ms = (time.perf_counter() - t) * 1000
            for i, out, out_type in encoded:
                answers[i] = (200, out, out_type, model_ms)
            return answers
        finally:
            with self._computing_lock:
                self.computing -= 1

    def _capture(self, variant: str, role: str, event_id: str, inference_id: str, when, body: bytes,
                 content_type: Optional[str], out: bytes, out_type: Optional[str], status: int, latency_ms: float,
                 model_ms: Optional[float], model_version: Optional[str], error: Optional[str]) -> None:
        attributes = {"variant": variant, "role": role, "statusCode": status, "latencyMs": round(latency_ms, 3),
                      "modelLatencyMs": None if model_ms is None else round(model_ms, 3),
                      "modelVersion": model_version}
        if error:
            attributes["error"] = error
        record = capture_record(event_id, inference_id, when, body, content_type, out, out_type, attributes,
                                self.cfg.capture_max_payload_bytes)
        self.capture.write(variant, when, record)

    def _capture_shadow(self, r: ShadowResult, event_id: str, inference_id: str, when, body: bytes,
                        content_type: Optional[str]) -> None:
        self._capture(self.cfg.shadow_variant_name, "shadow", event_id, inference_id, when, body, content_type,
                      r.body, r.content_type, r.status, r.latency_ms, r.model_latency_ms, r.model_version, r.error)


def create_app(cfg: ServeConfig) -> Starlette:
    service = InferenceService(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.startup()
        try:
            yield
        finally:
            await service.shutdown()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        field = "method" if exc.status_code == 405 else "path"
        status, body, media = _error(exc.status_code, field, f"{request.method} {request.url.path}: {exc.detail}")
        return Response(body, status, headers=exc.headers, media_type=media)

    async def server_error(request: Request, exc: Exception) -> Response:
        status, body, media = _error(500, "server", "internal error; see the server log")
        return Response(body, status, media_type=media)

    app = Starlette(routes=[Route("/ping", service.ping, methods=["GET"]),
                            Route("/invocations", service.invocations, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.service = service
    return app


CONFIG_ENV = "TWOTOWER_SERVE_CONFIG_JSON"


def app_from_env() -> Starlette:
    """App factory for multi-process serving: the parent passes its config in the environment."""
    return create_app(ServingConfig(**json.loads(os.environ[CONFIG_ENV])))
