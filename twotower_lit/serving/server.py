"""The inference server: ``serve`` in the container, ``python -m entrypoints.serve`` locally.

uvicorn runs `twotower_lit.serving.app` on 127.0.0.1:8080 (the serving image: 0.0.0.0:8080, as
SageMaker requires; or a Unix socket), with deadlines for slow request heads
(`twotower_lit.serving.protocol`) and bodies. With ``--shadow-model-dir`` the shadow model runs in
a supervised child process and production mirrors requests to it; ``--shadow-url`` mirrors to a
shadow server that runs elsewhere.
SIGTERM (or SIGINT) stops accepting connections, lets in-flight requests and shadow calls finish
(``--graceful-timeout``, ``--shadow-timeout``), flushes data capture, then stops the shadow child.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

import uvicorn

from twotower_lit.config import ServeConfig
from twotower_lit.options import OneLineHelpFormatter, add_arguments, from_namespace
from twotower_lit.export.format import ArtifactError, verify as verify_export
from twotower_lit.serving.app import CONFIG_ENV, create_app
from twotower_lit.serving.handler import DEFAULT_MODEL_DIR, config_from_env
from twotower_lit.serving.options import ServingConfig
from twotower_lit.export.search import read_index_meta
from twotower_lit.serving.protocol import HeaderTimeoutProtocol
from twotower_lit.serving.shadow import ShadowProcess

log = logging.getLogger("twotower_lit.serving")


def parse_args(argv: Optional[List[str]] = None) -> ServeConfig:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=OneLineHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["serve"],
                        help="ignored: SageMaker starts the container as `<image> serve`")
    add_arguments(parser, ServingConfig)
    ns = parser.parse_args(argv)
    del ns.command
    # defaults < TWOTOWER_* environment (how SageMaker model settings arrive) < command line
    base = config_from_env()
    return from_namespace(ServingConfig, argparse.Namespace(**{**dataclasses.asdict(base), **vars(ns)}))


def check(cfg: ServeConfig) -> None:
    """Reject settings that cannot work, naming the option."""
    problems = []
    for name in ("workers", "num_threads", "max_concurrency", "max_body_bytes", "max_batch", "max_k",
                 "shadow_max_in_flight", "capture_max_payload_bytes", "batch_max_requests"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("request_timeout", "header_timeout", "body_timeout", "shadow_timeout"):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if cfg.batch_max_wait_ms < 0:
        problems.append("--batch-max-wait-ms must not be negative")
    for name in ("shadow_sampling_percent", "capture_sampling_percent"):
        if not 0 <= getattr(cfg, name) <= 100:
            problems.append(f"--{name.replace('_', '-')} must be within 0..100")
    if not 1 <= cfg.default_k <= cfg.max_k:
        problems.append(f"--default-k must be within 1..--max-k ({cfg.max_k})")
    if cfg.shadow_model_dir and cfg.shadow_url:
        problems.append("give --shadow-model-dir or --shadow-url, not both")
    if cfg.search not in ("exact", "auto") and importlib.util.find_spec("faiss") is None:
        problems.append(f"--search {cfg.search} needs the faiss package (pip install faiss-cpu); or use --search exact")
    if problems:
        raise SystemExit("serve: " + "; ".join(problems))


def serve(cfg: ServeConfig) -> None:
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    check(cfg)
    cfg = dataclasses.replace(cfg, model_dir=cfg.model_dir or DEFAULT_MODEL_DIR)
    if not os.path.isdir(cfg.model_dir):
        raise SystemExit(f"serve: model directory {cfg.model_dir} does not exist (--model-dir or SM_MODEL_DIR)")
    try:  # here, so that a damaged or altered model is one line, not a traceback from the app's start-up
        manifest = verify_export(cfg.model_dir)
        indexes = (read_index_meta(cfg.model_dir, manifest) or {}).get("indexes", {})
        if cfg.search not in ("exact", "auto", "faiss") and cfg.search not in indexes:
            raise ArtifactError(f"{cfg.model_dir} has no {cfg.search!r} index (it has: {', '.join(indexes) or 'none'});"
                                f" build it with python -m entrypoints.index --model-dir {cfg.model_dir} --index "
                                f"{cfg.search.split('-')[0]}, or serve with --search auto")
    except ArtifactError as e:
        raise SystemExit(f"serve: {e}") from None
    shadow = ShadowProcess(cfg).start() if cfg.shadow_model_dir else None
    if shadow is not None:
        cfg = dataclasses.replace(cfg, shadow_url=shadow.target)
    where = {"uds": cfg.uds} if cfg.uds else {"host": cfg.host, "port": cfg.port}
    common = dict(**where, timeout_keep_alive=cfg.keep_alive, timeout_graceful_shutdown=int(cfg.graceful_timeout),
                  log_level=cfg.log_level, access_log=cfg.log_level == "debug", lifespan="on",
                  http=functools.partial(HeaderTimeoutProtocol, header_timeout=cfg.header_timeout))
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to whatever handler
    # was installed before it; with these, that ends in the `finally` below (shadow child stopped)
    # and a clean exit, rather than a kill by the default handler.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("signal %s: shut down", signum))
    app = None
    try:
        if cfg.workers > 1:
            os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg))
            uvicorn.run("twotower_lit.serving.app:app_from_env", factory=True, workers=cfg.workers, **common)
        else:
            app = create_app(cfg)
            server = uvicorn.Server(uvicorn.Config(app, **common))
            server.run()
            if not server.started:
                raise SystemExit(1)
    finally:
        if shadow is not None:
            shadow.stop()
    # Everything is flushed and stopped. Left are the thread pool's workers: idle ones would delay
    # the exit by their idle timeout, and one stuck in a hung model call (abandoned at its request
    # timeout) would block it for ever, so do not wait for them.
    hung = app.state.service.computing if app is not None else 0
    if hung:
        log.warning("exiting with %d model call(s) still running (abandoned at their request timeout)", hung)
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        os._exit(0)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point (``serve = twotower_lit.serving.server:main``)."""
    serve(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
