"""What SageMaker's four handler functions do; `entrypoints/inference.py` and the HTTP server
(`twotower_lit.serving.app`) both call these, so a request is served by the same code either way.

    load_model(model_dir, cfg)      -> ServingModel   (model_fn)
    decode(body, content_type, cfg) -> RecommendRequest (input_fn)
    predict(request, model)         -> response payload (predict_fn)
    encode(payload, accept)         -> (bytes, content type) (output_fn)

Only torch, numpy (through the export format), safetensors and the standard library are imported.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from twotower_lit.config import ServeConfig, from_dict
from twotower_lit.export.format import load_export
from twotower_lit.serving import faults
from twotower_lit.serving.recommender import Recommender
from twotower_lit.serving.request import RecommendRequest, negotiate, parse_request

log = logging.getLogger(__name__)

ENV_PREFIX = "TWOTOWER_"
DEFAULT_MODEL_DIR = "/opt/ml/model"


def config_from_env(environ: Optional[Mapping[str, str]] = None, base: Optional[ServeConfig] = None) -> ServeConfig:
    """`base` (default: the defaults) with every ``TWOTOWER_<FIELD>`` variable applied, e.g.
    ``TWOTOWER_NUM_THREADS=2``; the model directory falls back to ``SM_MODEL_DIR``."""
    environ = os.environ if environ is None else environ
    values = dataclasses.asdict(base or ServeConfig())
    for name in values:
        if ENV_PREFIX + name.upper() in environ:
            values[name] = environ[ENV_PREFIX + name.upper()]
    if values["model_dir"] is None:
        values["model_dir"] = environ.get("SM_MODEL_DIR") or None
    try:
        return from_dict(ServeConfig, values)
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
    multiply tail latency (FINDINGS: p99 8-32 ms with two threads on two cores)."""
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
    model = ServingModel(Recommender(exported, search=cfg.search), cfg, faults.for_variant(cfg.variant_name))
    log.info("loaded model %s from %s (%d users, %d items, search %s, %d thread(s)) in %.2f s",
             model.model_version, model_dir, len(exported.user_ids) - 1, exported.num_items, cfg.search,
             torch.get_num_threads(), time.perf_counter() - t0)
    return model


def decode(body: Union[bytes, str], content_type: Optional[str], cfg: ServeConfig) -> RecommendRequest:
    return parse_request(body, content_type, cfg)


def predict(request: RecommendRequest, model: ServingModel) -> Dict:
    """The response payload: per user, ranked items with id, title, genres and score."""
    if model.fault:
        faults.inject(model.fault)
    items = model.recommender.model.items
    predictions = []
    for rec in model.recommender.recommend(request):
        entry = {"user_id": rec.user_id, "source": rec.source,
                 "items": [{"id": items[c]["id"], "title": items[c]["title"], "genres": items[c]["genres"],
                            "score": round(float(s), 6)} for c, s in zip(rec.columns, rec.scores)]}
        if rec.reason:
            entry["fallback_reason"] = rec.reason
        predictions.append(entry)
    return {"model_version": model.model_version, "k": request.k, "predictions": predictions}


def encode(payload: Dict, accept: Optional[str]) -> Tuple[bytes, str]:
    media = negotiate(accept)
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), media
