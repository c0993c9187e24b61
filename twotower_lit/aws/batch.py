"""SageMaker Batch Transform: recommendations for a file of users, offline, on SageMaker's machines.

The same model.tar.gz and handler as the real-time endpoint (`twotower_lit.aws.deploy`): the
input is JSON lines (one request per line, e.g. ``{"user_id": 42, "k": 100}``), split by line
(``SplitType=Line``) into multi-record invocations (``BatchStrategy=MultiRecord``) that the
handler answers line for line (`twotower_lit.serving.handler.decode_lines`); SageMaker joins the
answers into ``<input name>.out`` (``AssembleWith=Line``). `fetch_results` downloads them and
writes the rows as the local command does (`twotower_lit.batch`): user_id, rank, item_id, score,
title, source.

boto3 only; the request bodies are pure functions the tests validate against botocore's model.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from twotower_lit.aws.config import DEFAULT_INFERENCE_FRAMEWORK
from twotower_lit.aws.deploy import model_data_uri, model_request, serving_image, wait_for_status
from twotower_lit.aws.s3 import download_prefix, list_objects, upload_file
from twotower_lit.aws.session import AwsContext, parse_key_values, resource_name
from twotower_lit.options import opt as _opt

log = logging.getLogger(__name__)

JSON_LINES = "application/jsonlines"
_DONE = ("Completed", "Failed", "Stopped")
# SageMaker's limits on a transform job
MAX_PAYLOAD_MB = 100
MAX_INVOCATION_TIMEOUT = 3600


@dataclass
class BatchTransformConfig:
    """A Batch Transform job over JSON-lines users (`entrypoints.sagemaker_batch`)."""

    model: Optional[str] = _opt(None, "what to run: an exported model directory, a model.tar.gz (local or s3://) or "
                                      "'job:<training job name>'")
    input: Optional[str] = _opt(None, "JSON-lines users: an s3:// prefix or object, a local file (uploaded), or "
                                      "'all': every user of a local --model directory, one line each with --k")
    output: Optional[str] = _opt(None, "S3 prefix for the answers (default s3://BUCKET/PREFIX/batch/<job>/output)")
    fetch_to: Optional[str] = _opt(None, "after the job: download the answers here and write recommendations.parquet")
    k: int = _opt(100, "--input all: items per user")
    job_name: Optional[str] = _opt(None, "transform job name (default <project>-batch-<UTC timestamp>)")
    model_name: Optional[str] = _opt(None, "SageMaker model name (default: the job's name)")
    transform_instance_type: str = _opt("ml.m5.xlarge", "instance type of the transform job")
    transform_instance_count: int = _opt(1, "instances (SageMaker splits the input files among them)")
    max_payload_mb: int = _opt(1, "most MB of lines per invocation (multi-record batches up to this size)")
    max_concurrent_transforms: int = _opt(1, "invocations in flight per instance (one per handler worker)")
    max_users_per_invocation: int = _opt(10000, "the handler's user limit per invocation (TWOTOWER_MAX_BATCH of "
                                                "the transform's model; an invocation over it fails)")
    invocation_timeout: int = _opt(600, "seconds one invocation may take (SageMaker's limit: 3600)")
    serving_image: Optional[str] = _opt(None, "inference image (default: AWS's PyTorch inference image)")
    inference_framework: str = _opt(DEFAULT_INFERENCE_FRAMEWORK, "PyTorch version of AWS's inference image")
    serving_env: Optional[str] = _opt(None, "extra container environment 'NAME=value,...'")
    wait: bool = _opt(True, "wait for the job to finish (and fetch with --fetch-to)")
    wait_timeout: int = _opt(24 * 3600, "seconds to wait for the job")


def transform_job_request(ctx: AwsContext, name: str, model_name: str, input_uri: str, output_uri: str,
                          cfg: BatchTransformConfig) -> Dict[str, Any]:
    """CreateTransformJob: JSON lines split by line into multi-record invocations, answers joined by line.
    No Accept: the handler answers a JSON-lines body with JSON lines whatever the client accepts
    of JSON, and the project's own server refuses an Accept it does not know."""
    if not 1 <= cfg.max_payload_mb <= MAX_PAYLOAD_MB:
        raise ValueError(f"--max-payload-mb {cfg.max_payload_mb}: SageMaker allows 1 to {MAX_PAYLOAD_MB}")
    if not 1 <= cfg.invocation_timeout <= MAX_INVOCATION_TIMEOUT:
        raise ValueError(f"--invocation-timeout {cfg.invocation_timeout}: SageMaker allows 1 to "
                         f"{MAX_INVOCATION_TIMEOUT} seconds")
    return {
        "TransformJobName": name, "ModelName": model_name,
        "MaxConcurrentTransforms": cfg.max_concurrent_transforms, "MaxPayloadInMB": cfg.max_payload_mb,
        "BatchStrategy": "MultiRecord",
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": cfg.invocation_timeout, "InvocationsMaxRetries": 1},
        "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
                           "ContentType": JSON_LINES, "CompressionType": "None", "SplitType": "Line"},
        "TransformOutput": {"S3OutputPath": output_uri, "AssembleWith": "Line"},
        "TransformResources": {"InstanceType": cfg.transform_instance_type,
                               "InstanceCount": cfg.transform_instance_count},
        "Tags": ctx.tags(),
    }


def transform_environment(cfg: BatchTransformConfig) -> Dict[str, str]:
    """The handler's limits for multi-record invocations: as many users and bytes as one may carry."""
    env = {"TWOTOWER_MAX_BATCH": str(cfg.max_users_per_invocation),
           "TWOTOWER_MAX_BODY_BYTES": str(cfg.max_payload_mb * 1024 * 1024)}
    env.update(parse_key_values(cfg.serving_env))
    return env


def all_users_lines(model_dir: str, k: int, path: str) -> int:
    """Write one JSON line per user of a local export (``{"user_id": ..., "k": k}``); returns the count."""
    with open(os.path.join(model_dir, "users.json"), encoding="utf-8") as f:
        user_ids = json.load(f)[1:]  # index 0 is the unknown user
    with open(path, "w", encoding="utf-8") as f:
        for uid in user_ids:
            f.write(json.dumps({"user_id": uid, "k": k}) + "\n")
    return len(user_ids)


def input_uri(ctx: AwsContext, cfg: BatchTransformConfig, job_name: str) -> str:
    """The job's input in S3: as given, or a local file / every user of the model uploaded."""
    if not cfg.input:
        raise ValueError("--input is required: an s3:// URI of JSON lines, a local JSON-lines file or 'all'")
    if cfg.input.startswith("s3://"):
        return cfg.input
    target = ctx.s3_uri("batch", job_name, "input", "users.jsonl")
    if cfg.input == "all":
        if not (cfg.model and os.path.isdir(cfg.model)):
            raise ValueError("--input all lists the users of a local --model directory; give --input a JSON-lines "
                             "file or s3:// URI for another kind of --model")
        from twotower_lit.export.format import verify

        verify(cfg.model)  # users.json is read here, before the model is packaged: checked first
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "users.jsonl")
            n = all_users_lines(cfg.model, cfg.k, path)
            log.info("input: %d users of %s, k=%d", n, cfg.model, cfg.k)
            return upload_file(ctx.s3, path, target)
    if not os.path.isfile(cfg.input):
        raise FileNotFoundError(f"--input {cfg.input}: not an s3:// URI, a local file or 'all'")
    return upload_file(ctx.s3, cfg.input, ctx.s3_uri("batch", job_name, "input", os.path.basename(cfg.input)))


def start_transform(ctx: AwsContext, cfg: BatchTransformConfig) -> Dict[str, Any]:
    """Package/upload the model, create the SageMaker model with the transform's limits, upload the
    input if local, create the transform job. Returns the names and URIs."""
    if not cfg.model:
        raise ValueError("--model is required (an exported model directory, model.tar.gz, s3:// URI or job:<name>)")
    name = cfg.job_name or resource_name(ctx.cfg.project, "batch", "@time")
    model_name = cfg.model_name or name
    source = input_uri(ctx, cfg, name)
    model_data = model_data_uri(ctx, cfg.model, model_name)
    image = serving_image(ctx, cfg, cfg.transform_instance_type)
    ctx.sagemaker.create_model(**model_request(ctx, model_name, image, model_data, transform_environment(cfg)))
    output = (cfg.output or ctx.s3_uri("batch", name, "output")).rstrip("/")
    ctx.sagemaker.create_transform_job(**transform_job_request(ctx, name, model_name, source, output, cfg))
    return {"job": name, "model": model_name, "model_data": model_data, "image": image, "input": source,
            "output": output}


def wait_for_transform(ctx: AwsContext, name: str, timeout: float = 24 * 3600, poll: float = 30.0) -> Dict:
    """Poll until the job ends; raise with SageMaker's FailureReason unless it completed."""
    return wait_for_status(lambda: ctx.sagemaker.describe_transform_job(TransformJobName=name),
                           "TransformJobStatus", "Completed", _DONE, f"transform job {name}", timeout, poll)


def parse_answers(lines: List[str], where: str):
    """Rows (user_id, rank, item_id, score, title, source) of the answer lines of one output file;
    an error answer or a line that is not one is refused, naming the file and line."""
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            answer = json.loads(line)
            predictions = answer["predictions"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{where}:{n}: not an answer of the handler: {line[:200]!r}") from None
        for pred in predictions:
            for rank, item in enumerate(pred["items"], start=1):
                rows.append((pred["user_id"], rank, item["id"], item["score"], item.get("title"), pred["source"]))
    return rows


def fetch_results(ctx: AwsContext, output_uri: str, local_dir: str) -> Dict[str, Any]:
    """Download the job's ``*.out`` files into `local_dir` and write their rows to
    ``local_dir/recommendations.parquet`` (the layout of `entrypoints.recommend`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twotower_lit.batch import SCHEMA, SOURCES
    from twotower_lit.data.storage import PARQUET_OPTIONS

    outs = sorted(rel for rel in list_objects(ctx.s3, output_uri) if rel.endswith(".out"))
    if not outs:
        raise RuntimeError(f"{output_uri}: no .out files; the job wrote no answers (see its CloudWatch logs)")
    paths = download_prefix(ctx.s3, output_uri, local_dir, keep=lambda rel: rel.endswith(".out"))
    rows = []
    for path in sorted(paths):
        with open(path, encoding="utf-8") as f:
            rows += parse_answers(f.read().split("\n"), path)
    cols = list(zip(*rows)) if rows else [()] * 6
    unknown = sorted(set(cols[5]) - set(SOURCES))
    if unknown:
        raise ValueError(f"{output_uri}: answers with unknown sources {unknown}")
    table = pa.Table.from_arrays(
        [pa.array(cols[0], pa.int64()), pa.array(cols[1], pa.int32()), pa.array(cols[2], pa.int64()),
         pa.array(cols[3], pa.float32()), pa.array(cols[4], pa.string()),
         pa.DictionaryArray.from_arrays(pa.array([SOURCES.index(s) for s in cols[5]], pa.int8()),
                                        pa.array(SOURCES, pa.string()))], schema=SCHEMA)
    parquet = os.path.join(local_dir, "recommendations.parquet")
    pq.write_table(table, parquet, **PARQUET_OPTIONS)
    return {"files": len(paths), "rows": table.num_rows, "users": len(set(cols[0])), "parquet": parquet}


def run_transform(ctx: AwsContext, cfg: BatchTransformConfig, poll: float = 30.0) -> Dict[str, Any]:
    """Start the job; with ``wait``, wait for it and (with ``fetch_to``) fetch its answers."""
    out = start_transform(ctx, cfg)
    if cfg.wait:
        desc = wait_for_transform(ctx, out["job"], cfg.wait_timeout, poll)
        out["status"] = desc["TransformJobStatus"]
        if cfg.fetch_to:
            out["fetched"] = fetch_results(ctx, out["output"], cfg.fetch_to)
    return out
