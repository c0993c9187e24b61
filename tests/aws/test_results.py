"""Shadow results from SageMaker: traffic through sagemaker-runtime, capture from S3 in SageMaker's
format, CloudWatch metrics per variant, and the same report as the local stack."""
import datetime as dt
import json
import os
import uuid

import pytest

from tests.aws.conftest import queue_endpoint_results
from twotower_lit.aws import results
from twotower_lit.config import LoadConfig, ShadowReportConfig
from twotower_lit.serving import capture as cap
from twotower_lit.serving.report import build_report

ENDPOINT = "ep-shadow-test"
N = 60


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from entrypoints import inference
    from twotower_lit.serving.synthetic import random_export

    models = {}
    for role, seed in (("production", 0), ("shadow", 1)):
        path = tmp_path_factory.mktemp("models") / role
        random_export(str(path), num_users=30, num_items=80, seed=seed)
        models[role] = inference.model_fn(str(path))
    return models


def requests_and_answers(models):
    """N requests with each variant's real answer (what both variants' containers would return)."""
    from entrypoints import inference

    out = []
    for n in range(N):
        body = json.dumps({"user_id": 1 + n % 30, "k": 10}).encode()
        answers = {role: json.dumps(inference.predict_fn(inference.input_fn(body, "application/json"), m)).encode()
                   for role, m in models.items()}
        out.append((body, answers))
    return out


def write_local_capture(root, traffic, when):
    """What the local server writes (with its customAttributes)."""
    for role, variant in (("production", "production"), ("shadow", "shadow")):
        folder = os.path.join(root, ENDPOINT, variant, when.strftime("%Y/%m/%d/%H"))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "00-00-000-local.jsonl"), "w") as f:
            for n, (body, answers) in enumerate(traffic):
                rec = cap.capture_record(f"ev-{n}", f"inf-{n}", when, body, "application/json", answers[role],
                                         "application/json", {"variant": variant, "role": role, "statusCode": 200,
                                                              "latencyMs": 5.0, "modelLatencyMs": 2.0})
                f.write(json.dumps(rec) + "\n")


def sagemaker_line(event_id: str, inference_id: str, when: dt.datetime, body: bytes, answer: bytes) -> str:
    """One capture line as SageMaker's data capture documentation shows it (JSON content types
    captured as text): no customAttributes, inferenceTime in whole seconds. Written out here, not
    with our capture writer, so a difference between the two formats shows."""
    return (
        '{"captureData":{"endpointInput":{"observedContentType":"application/json","mode":"INPUT",'
        f'"data":{json.dumps(body.decode())},"encoding":"JSON"}},'
        '"endpointOutput":{"observedContentType":"application/json","mode":"OUTPUT",'
        f'"data":{json.dumps(answer.decode())},"encoding":"JSON"}}}},'
        f'"eventMetadata":{{"eventId":"{event_id}","inferenceId":"{inference_id}",'
        f'"inferenceTime":"{when:%Y-%m-%dT%H:%M:%SZ}"}},"eventVersion":"0"}}')


def put_sagemaker_capture(ctx, uri, traffic, when):
    """What SageMaker writes: its own eventId per record, the caller's inferenceId."""
    from twotower_lit.aws.session import parse_s3_uri

    bucket, prefix = parse_s3_uri(uri)
    for variant, role in (("AllTraffic", "production"), ("ShadowTraffic", "shadow")):
        lines = [sagemaker_line(str(uuid.uuid4()), f"inf-{n}", when, body, answers[role])
                 for n, (body, answers) in enumerate(traffic)]
        key = f"{prefix}/{ENDPOINT}/{variant}/{when:%Y/%m/%d/%H}/{when:%M-%S}-123-{uuid.uuid4()}.jsonl"
        ctx.s3.put_object(Bucket=bucket, Key=key, Body="\n".join(lines).encode())


def put_cloudwatch(ctx, when):
    cw = ctx.client("cloudwatch")
    for variant, latency_us in (("AllTraffic", 2000.0), ("ShadowTraffic", 3000.0)):
        dims = [{"Name": "EndpointName", "Value": ENDPOINT}, {"Name": "VariantName", "Value": variant}]
        cw.put_metric_data(Namespace="AWS/SageMaker", MetricData=[
            {"MetricName": "Invocations", "Dimensions": dims, "Timestamp": when, "Value": float(N), "Unit": "None"},
            {"MetricName": "ModelLatency", "Dimensions": dims, "Timestamp": when, "Value": latency_us,
             "Unit": "Microseconds"},
            {"MetricName": "OverheadLatency", "Dimensions": dims, "Timestamp": when, "Value": 500.0,
             "Unit": "Microseconds"}])


def test_sagemaker_capture_gives_the_same_report_as_the_local_one(ctx, two_models, tmp_path):
    traffic = requests_and_answers(two_models)
    when = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(minutes=2)
    write_local_capture(str(tmp_path / "local"), traffic, when)
    local = build_report(ShadowReportConfig(capture_dir=str(tmp_path / "local"), min_requests=10))

    uri = ctx.s3_uri("capture")
    put_sagemaker_capture(ctx, uri, traffic, when)
    put_cloudwatch(ctx, when)
    roles = {"AllTraffic": "production", "ShadowTraffic": "shadow"}
    report_cfg = ShadowReportConfig(capture_dir=str(tmp_path / "sm"), output_dir=str(tmp_path / "report"),
                                    min_requests=10)
    # moto's CloudWatch has no percentile statistics; the percentile queries' shape is checked below
    out = results.shadow_report(ctx, ENDPOINT, uri, roles, report_cfg, period=60, percentiles=())

    assert out["captured"] == {"AllTraffic": N, "ShadowTraffic": N}
    assert out["joined_requests"] == local["joined_requests"] == N
    assert out["agreement"] == local["agreement"]
    for role in ("production", "shadow"):
        assert out["variants"][role]["requests"] == N and out["variants"][role]["server_errors"] == 0
        assert out["variants"][role]["model_latency_ms"] == {"count": 0}  # SageMaker keeps latency in CloudWatch
    assert out["cloudwatch"]["AllTraffic"]["invocations"] == N
    assert out["cloudwatch"]["AllTraffic"]["modelLatency_ms"]["mean_of_periods"] == pytest.approx(2.0)
    assert out["cloudwatch"]["ShadowTraffic"]["modelLatency_ms"]["mean_of_periods"] == pytest.approx(3.0)
    for name in ("report.json", "report.md", "cloudwatch.json", "cloudwatch.png"):
        assert os.path.getsize(tmp_path / "report" / name) > 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["verdict"] == out["verdict"]


def test_error_payloads_keep_their_status_and_unparseable_ones_count_as_errors():
    rec = json.loads(sagemaker_line("e", "i", dt.datetime.now(dt.timezone.utc), b"{}",
                                    b'{"error": {"status": 400, "field": "k", "message": "bad"}}'))
    assert results.normalise_record(rec, "AllTraffic", "production")["eventMetadata"]["customAttributes"] == {
        "variant": "AllTraffic", "role": "production", "statusCode": 400, "sagemakerEventId": "e"}
    rec["captureData"]["endpointOutput"]["data"] = "<html>502</html>"
    rec["eventMetadata"]["customAttributes"] = None
    attributes = results.normalise_record(rec, "AllTraffic", "production")["eventMetadata"]["customAttributes"]
    assert attributes["statusCode"] == 0


def test_percentile_metric_queries_have_the_real_api_shape(stubbed, request_log):
    ctx, stub = stubbed
    cw = ctx.client("cloudwatch")
    from botocore.stub import Stubber

    start = dt.datetime(2026, 11, 26, 12, tzinfo=dt.timezone.utc)
    end = dt.datetime(2026, 11, 26, 13, tzinfo=dt.timezone.utc)
    queries = results.metric_queries(ENDPOINT, ["AllTraffic", "ShadowTraffic"], 60)
    with Stubber(cw) as cws:
        cws.add_response("get_metric_data", {"MetricDataResults": [
            {"Id": q["Id"], "Label": q["Label"], "Timestamps": [start], "Values": [1500.0], "StatusCode": "Complete"}
            for q in queries]}, {"MetricDataQueries": queries, "StartTime": start, "EndTime": end,
                                 "ScanBy": "TimestampAscending"})
        metrics = results.variant_metrics(ctx, ENDPOINT, ["AllTraffic", "ShadowTraffic"], start, end, 60)
    stats = {q["MetricStat"]["Stat"] for q in queries}
    assert {"p50", "p90", "p99", "Average", "Maximum", "Sum"} == stats
    assert metrics["ShadowTraffic"]["ModelLatency"]["p99"]["values"] == [1.5]  # microseconds -> ms
    assert metrics["AllTraffic"]["Invocations"]["Sum"]["values"] == [1500.0]


def test_load_generator_traffic_through_sagemaker_runtime(ctx, moto_server, request_log):
    from twotower_lit.serving.load import run

    before = len(request_log.calls("InvokeEndpoint"))
    queue_endpoint_results(moto_server, [{"Body": '{"predictions": []}', "ContentType": "application/json"}] * 20)
    summary = run(LoadConfig(user_ids="1,2,3,4", requests=20, rate=0, concurrency=4, k=5),
                  send=results.runtime_sender(ctx, ENDPOINT))
    assert summary["requests"] == 20 and summary["ok"] == 20, summary
    calls = request_log.calls("InvokeEndpoint")[before:]
    assert len(calls) == 20 and len({c["InferenceId"] for c in calls}) == 20
    assert {json.loads(c["Body"])["user_id"] for c in calls} <= {1, 2, 3, 4}
