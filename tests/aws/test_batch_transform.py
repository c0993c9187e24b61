"""SageMaker Batch Transform on moto: the model with the transform's limits, the JSON-lines input
uploaded, CreateTransformJob (SplitType=Line, MultiRecord, AssembleWith=Line; validated against
botocore's model by the request recorder), waiting, and fetching the answers into the layout of
entrypoints.recommend. moto runs no container, so the test plays SageMaker's data plane: it splits
the input by line into multi-record invocations of the real HTTP server (the same handler) and
writes the joined answers where the job would."""
import json

import httpx
import pytest

from tests.serving.conftest import ServerProcess
from twotower_lit.aws.batch import (BatchTransformConfig, fetch_results, run_transform, start_transform,
                                    transform_job_request, wait_for_transform)
from twotower_lit.aws.session import parse_s3_uri
from twotower_lit.batch import RecommendConfig, read_recommendations, recommend
from twotower_lit.serving.synthetic import random_export


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / "m")
    random_export(path, num_users=40, num_items=120, seed=3)
    return path


def _play_sagemaker(ctx, request, model_request, model_dir, tmp_path, lines_per_invocation=7):
    """What the transform job does with the input: multi-record invocations, answers joined by line."""
    env = model_request["PrimaryContainer"]["Environment"]
    server = ServerProcess(["--model-dir", model_dir, "--max-batch", env["TWOTOWER_MAX_BATCH"],
                            "--max-body-bytes", env["TWOTOWER_MAX_BODY_BYTES"]], tmp_path / "server.log")
    try:
        source = request["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
        bucket, key = parse_s3_uri(source)
        lines = ctx.s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()
        limit = request["MaxPayloadInMB"] * 1024 * 1024
        answers = []
        for lo in range(0, len(lines), lines_per_invocation):
            body = "\n".join(lines[lo:lo + lines_per_invocation]) + "\n"
            assert len(body.encode()) <= limit
            r = httpx.post(server.url + "/invocations", content=body, timeout=60,
                           headers={"Content-Type": request["TransformInput"]["ContentType"]})
            assert r.status_code == 200, r.text
            answers += r.text.splitlines()
        assert len(answers) == len(lines)  # one answer line per input line: what AssembleWith=Line joins
        out_bucket, out_prefix = parse_s3_uri(request["TransformOutput"]["S3OutputPath"])
        ctx.s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}/{key.rsplit('/', 1)[-1]}.out",
                          Body=("\n".join(answers) + "\n").encode())
    finally:
        server.stop()


def test_transform_of_every_user_matches_the_local_command(ctx, request_log, model_dir, tmp_path):
    cfg = BatchTransformConfig(model=model_dir, input="all", k=8, fetch_to=str(tmp_path / "fetched"),
                               max_users_per_invocation=50)
    started = start_transform(ctx, cfg)
    (req,) = [r for r in request_log.calls("CreateTransformJob") if r["TransformJobName"] == started["job"]]
    (model_req,) = [r for r in request_log.calls("CreateModel") if r["ModelName"] == started["model"]]
    assert req["BatchStrategy"] == "MultiRecord" and req["TransformInput"]["SplitType"] == "Line"
    assert req["TransformInput"]["ContentType"] == "application/jsonlines" and "Accept" not in req["TransformOutput"]
    assert req["TransformOutput"]["AssembleWith"] == "Line" and req["ModelName"] == started["model"]
    assert model_req["PrimaryContainer"]["ModelDataUrl"] == started["model_data"]
    assert model_req["PrimaryContainer"]["Environment"]["TWOTOWER_MAX_BATCH"] == "50"
    assert {"Key": "project", "Value": ctx.cfg.project} in req["Tags"]
    bucket, key = parse_s3_uri(started["input"])
    lines = ctx.s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"user_id": u, "k": 8} for u in range(1, 41)]

    _play_sagemaker(ctx, req, model_req, model_dir, tmp_path)  # (the model.tar.gz holds this directory)
    assert wait_for_transform(ctx, started["job"], timeout=30, poll=0.1)["TransformJobStatus"] == "Completed"
    fetched = fetch_results(ctx, started["output"], cfg.fetch_to)
    assert fetched["users"] == 40 and fetched["rows"] == 40 * 8 and fetched["files"] == 1

    local = tmp_path / "local.parquet"
    recommend(RecommendConfig(model_dir=model_dir, output=str(local), k=8, progress=False))
    mine, theirs = read_recommendations(str(local))[0], read_recommendations(fetched["parquet"])[0]
    assert theirs.column_names == mine.column_names
    assert theirs.select(["user_id", "rank", "item_id", "title", "source"]).equals(
        mine.select(["user_id", "rank", "item_id", "title", "source"]))
    assert theirs.column("score").to_pylist() == pytest.approx(mine.column("score").to_pylist(), abs=2e-6)


def test_the_command_waits_and_refuses_to_fetch_nothing(ctx, model_dir, tmp_path):
    users = tmp_path / "users.jsonl"
    users.write_text('{"user_id": 1, "k": 3}\n{"user_id": 99999, "user_features": {"gender": "F"}}\n')
    cfg = BatchTransformConfig(model=model_dir, input=str(users), fetch_to=str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="no .out files"):
        run_transform(ctx, cfg, poll=0.1)  # moto completes the job at once, and nothing ran it
    bucket, key = parse_s3_uri(ctx.s3_uri("batch"))
    keys = [o["Key"] for o in ctx.s3.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]]
    assert any(k.endswith("/input/users.jsonl") for k in keys)


@pytest.mark.parametrize("field, value, message", [
    ("max_payload_mb", 0, "--max-payload-mb 0"), ("max_payload_mb", 101, "SageMaker allows 1 to 100"),
    ("invocation_timeout", 4000, "--invocation-timeout 4000"),
])
def test_limits_are_checked_before_anything_is_sent(ctx, field, value, message):
    cfg = BatchTransformConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        transform_job_request(ctx, "job", "model", "s3://b/in", "s3://b/out", cfg)


def test_input_all_needs_a_local_model_directory(ctx):
    with pytest.raises(ValueError, match="--input all lists the users of a local --model directory"):
        start_transform(ctx, BatchTransformConfig(model="s3://bucket/model.tar.gz", input="all"))
