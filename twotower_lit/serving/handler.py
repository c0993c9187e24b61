"""What SageMaker's four handler functions do; `entrypoints/inference.py` and the HTTP server
(`twotower_lit.serving.app`) both call these, so a request is served by the same code either way.

    load_model(model_dir, cfg)      -> ServingModel   (model_fn)
    decode(body, content_type, cfg) -> RecommendRequest, or LineBatch for JSON lines (input_fn)
    predict(request, model)         -> response payload, or one per line (predict_fn)
    encode(payload, accept)         -> (bytes, content type) (output_fn)

JSON lines (``application/jsonlines``): one request per line, each in the JSON form that
`twotower_lit.serving.request` accepts, answered with one JSON response per line in the same
order: what a SageMaker Batch Transform sends with ``SplitType=Line`` and
``BatchStrategy=MultiRecord`` (several records per invocation), and what it reassembles
line for line (``AssembleWith=Line``). The lines are scored as one batch.

Only torch, numpy (through the export format), safetensors and the standard library are imported.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from twotower_lit.config import ServeConfig
from twotower_lit.options import from_dict
from twotower_lit.export.format import load_export
from twotower_lit.serving import faults
from twotower_lit.serving.errors import RequestError, bad_request
from twotower_lit.serving.options import ServingConfig
from twotower_lit.serving.recommender import Recommender
from twotower_lit.serving.request import JSON, RecommendRequest, body_text, media_type, negotiate, parse_request

log = logging.getLogger(__name__)

ENV_PREFIX = "TWOTOWER_"
DEFAULT_MODEL_DIR = "/opt/ml/model"
JSON_LINES = "application/jsonlines"
# the names JSON lines go by (SageMaker's documentation uses the first)
JSON_LINES_TYPES = (JSON_LINES, "application/x-jsonlines", "application/jsonl", "application/x-ndjson")


@dataclass(frozen=True)
class LineBatch:
    """A JSON-lines body: one request per non-blank line, answered line for line."""

    lines: Tuple[RecommendRequest, ...]


def config_from_env(environ: Optional[Mapping[str, str]] = None, base: Optional[ServeConfig] = None) -> ServeConfig:
    """`base` (default: the defaults) with every ``TWOTOWER_<FIELD>`` variable applied, e.g.
    ``TWOTOWER_NUM_THREADS=2``; the model directory falls back to ``SM_MODEL_DIR``."""
    environ = os.environ if environ is None else environ
    values = dataclasses.asdict(base or ServingConfig())
    for name in values:
        if ENV_PREFIX + name.upper() in environ:
            values[name] = environ[ENV_PREFIX + name.upper()]
    if values["model_dir"] is None:
        values["model_dir"] = environ.get("SM_MODEL_DIR") or None
    try:
        return from_dict(ServingConfig, values)
    except ValueError as e:
        raise ValueError(f"a {ENV_PREFIX}* environment variable has a bad value: {e}") from e


@dataclass
class ServingModel:
    """What model_fn returns: the recommender plus the settings the other handlers need."""

    recommender: Recommender
    config: ServeConfig
    fault: Optional[str] = None

    @property
    def model_version(self) -> str:
        return self.recommender.model_version


def pin_threads(num_threads: int) -> None:
    """One compute thread per worker by default: on a few cores, more BLAS threads per worker
    multiply tail latency (docs/serving.md)."""
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


def load_model(model_dir: Optional[str], cfg: Optional[ServeConfig] = None) -> ServingModel:
    """Verify the artifact's checksums, load it (safetensors + JSON: nothing is unpickled) and
    build the recommender."""
    cfg = cfg or config_from_env()
    model_dir = model_dir or cfg.model_dir or DEFAULT_MODEL_DIR
    pin_threads(cfg.num_threads)
    t0 = time.perf_counter()
    exported = load_export(model_dir, check=True)
    model = ServingModel(Recommender(exported, search=cfg.search, model_dir=model_dir), cfg,
                         faults.for_variant(cfg.variant_name))
    log.info("loaded model %s from %s (%d users, %d items, search %s: %s, %d thread(s)) in %.2f s",
             model.model_version, model_dir, len(exported.user_ids) - 1, exported.num_items, cfg.search,
             model.recommender.search.describe(), torch.get_num_threads(), time.perf_counter() - t0)
    return model


def decode(body: Union[bytes, str], content_type: Optional[str],
           cfg: ServeConfig) -> Union[RecommendRequest, LineBatch]:
    if media_type(content_type) in JSON_LINES_TYPES:
        return decode_lines(body, cfg)
    return parse_request(body, content_type, cfg)


def decode_lines(body: Union[bytes, str, bytearray], cfg: ServeConfig) -> LineBatch:
    """A JSON-lines body: each non-blank line parsed as a JSON request (errors name the line), at
    most ``max_batch`` users in all."""
    if len(body) > cfg.max_body_bytes:
        raise RequestError(413, "body", f"{len(body)} bytes is over the limit of {cfg.max_body_bytes}")
    text = body_text(body)
    lines: List[RecommendRequest] = []
    users = 0
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            request = parse_request(line, JSON, cfg)
        except RequestError as e:
            field = f"line {n}" if e.field == "body" else f"line {n}.{e.field}"
            raise RequestError(e.status, field, e.detail) from None
        users += len(request.users)
        if users > cfg.max_batch:
            raise bad_request("body", f"more than {cfg.max_batch} users in the lines up to line {n} "
                                      f"(TWOTOWER_MAX_BATCH raises the limit)")
        lines.append(request)
    if not lines:
        raise bad_request("body", "no JSON lines")
    return LineBatch(tuple(lines))


def _payload(request: RecommendRequest, recs, model: ServingModel) -> Dict:
    """The response payload of one request: per user, ranked items with id, title, genres and score."""
    items = model.recommender.model.items
    predictions = []
    for rec in recs:
        entry = {"user_id": rec.user_id, "source": rec.source,
                 "items": [{"id": items[c]["id"], "title": items[c]["title"], "genres": items[c]["genres"],
                            "score": round(float(s), 6)} for c, s in zip(rec.columns, rec.scores)]}
        if rec.reason:
            entry["fallback_reason"] = rec.reason
        predictions.append(entry)
    return {"model_version": model.model_version, "k": request.k, "predictions": predictions}


def predict(request: Union[RecommendRequest, LineBatch], model: ServingModel) -> Union[Dict, List[Dict]]:
    """The response payload (a list of them, one per line, for a `LineBatch`)."""
    return predict_batch([request], model)[0]


def predict_batch(requests: Sequence[Union[RecommendRequest, LineBatch]],
                  model: ServingModel) -> List[Union[Dict, List[Dict]]]:
    """`predict` of several requests, their users (and lines) scored together, each with its own k
    and exclude_seen: how the server scores a micro-batch of concurrent requests."""
    if model.fault:
        for _ in requests:
            faults.inject(model.fault)
    flat = [line for r in requests for line in (r.lines if isinstance(r, LineBatch) else (r,))]
    answers = iter(model.recommender.recommend_many(flat))
    return [[_payload(line, next(answers), model) for line in r.lines] if isinstance(r, LineBatch)
            else _payload(r, next(answers), model) for r in requests]


def encode(payload: Union[Dict, List[Dict]], accept: Optional[str]) -> Tuple[bytes, str]:
    """JSON; for the answers of a JSON-lines request, one JSON document per line
    (``application/jsonlines``, whether the client accepts that or JSON)."""
    if isinstance(payload, list):
        if media_type(accept) not in JSON_LINES_TYPES:
            negotiate(accept)  # 406 unless JSON (or anything) is acceptable
        lines = [json.dumps(p, ensure_ascii=False, separators=(",", ":")) for p in payload]
        return ("\n".join(lines) + "\n").encode("utf-8"), JSON_LINES
    media = negotiate(accept)
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), media
