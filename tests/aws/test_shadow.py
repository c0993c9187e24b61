"""Both shadow routes. moto accepts the endpoint config but silently drops ShadowProductionVariants
and lacks update_endpoint and the inference-experiment calls: the requests are checked where they
are made (recorded and validated against botocore's model) and, for the calls moto lacks, answered
by a Stubber that also checks the responses' shapes."""
import datetime as dt
import re

import pytest

from tests.aws.conftest import ROLE
from twotower_lit.aws import shadow
from twotower_lit.aws.config import ShadowTestConfig
from twotower_lit.aws.session import check_request

ARN = "arn:aws:sagemaker:us-east-1:123456789012"


def cfg(**kw) -> ShadowTestConfig:
    values = dict(endpoint_name="ep", production_model="m-prod", shadow_model="m-shadow", poll_seconds=0.0,
                  wait_timeout=10)
    return ShadowTestConfig(**{**values, **kw})


def variant(model, name, instance="ml.m5.large", count=1):
    return {"ModelName": model, "VariantName": name, "InfrastructureConfig": {
        "InfrastructureType": "RealTimeInference",
        "RealTimeInferenceConfig": {"InstanceType": instance, "InstanceCount": count}}}


def endpoint(status="InService"):
    return {"EndpointName": "ep", "EndpointArn": f"{ARN}:endpoint/ep", "EndpointStatus": status,
            "CreationTime": "2026-01-01", "LastModifiedTime": "2026-01-01"}


def test_endpoint_config_with_shadow_variant_and_capture_on_moto(ctx, request_log):
    for model in ("m-prod", "m-shadow"):
        ctx.sagemaker.create_model(ModelName=model, ExecutionRoleArn=ROLE,
                                   PrimaryContainer={"Image": "img", "ModelDataUrl": ctx.s3_uri("m.tar.gz")})
    c = cfg(endpoint_name=f"ep-{ctx.cfg.project}", capture_percent=50)
    out = shadow.start_shadow_endpoint(ctx, c)
    sent = request_log.calls("CreateEndpointConfig")[-1]
    assert sent["EndpointConfigName"] == out["endpoint_config"]
    assert [v["ModelName"] for v in sent["ProductionVariants"]] == ["m-prod"]
    assert sent["ShadowProductionVariants"] == [{"VariantName": "shadow", "ModelName": "m-shadow",
                                                 "InstanceType": "ml.m5.large", "InitialInstanceCount": 1,
                                                 "InitialVariantWeight": 1.0}]
    assert sent["DataCaptureConfig"] == {
        "EnableCapture": True, "InitialSamplingPercentage": 50, "DestinationS3Uri": ctx.s3_uri("capture"),
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]}}
    assert ctx.sagemaker.describe_endpoint(EndpointName=c.endpoint_name)["EndpointStatus"] == "InService"


def test_endpoint_config_route_sends_the_documented_requests(stubbed):
    """start_shadow_endpoint's calls, as SageMaker's CreateEndpointConfig documents a shadow variant and
    data capture, written out here; the Stubber refuses any other parameters. The config name carries
    the time, so only its form is checked."""
    from botocore.stub import ANY

    ctx, stub = stubbed
    project, bucket = ctx.cfg.project, ctx.cfg.bucket

    def variant_of(model, name):
        return {"VariantName": name, "ModelName": model, "InstanceType": "ml.m5.large", "InitialInstanceCount": 1,
                "InitialVariantWeight": 1.0}

    stub.add_response("create_endpoint_config", {"EndpointConfigArn": f"{ARN}:endpoint-config/ep-shadow"}, {
        "EndpointConfigName": ANY,
        "ProductionVariants": [variant_of("m-prod", "production")],
        "ShadowProductionVariants": [variant_of("m-shadow", "shadow")],
        "DataCaptureConfig": {"EnableCapture": True, "InitialSamplingPercentage": 100,
                              "DestinationS3Uri": f"s3://{bucket}/twotower/capture",
                              "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
                              "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]}},
        "Tags": [{"Key": "project", "Value": project}]})
    stub.add_client_error("describe_endpoint", service_error_code="ValidationException",
                          service_message="Could not find endpoint \"ep\".", expected_params={"EndpointName": "ep"})
    stub.add_response("create_endpoint", {"EndpointArn": f"{ARN}:endpoint/ep"},
                      {"EndpointName": "ep", "EndpointConfigName": ANY, "Tags": [{"Key": "project", "Value": project}]})
    out = shadow.start_shadow_endpoint(ctx, cfg(), wait=False)
    assert out["action"] == "created" and out["capture"] == f"s3://{bucket}/twotower/capture"
    assert re.fullmatch(r"ep-shadow-[0-9-]+", out["endpoint_config"]), out["endpoint_config"]


@pytest.mark.parametrize("promote", [True, False])
def test_endpoint_config_route_promote_and_stop(stubbed, promote, request_log):
    ctx, stub = stubbed
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": f"{ARN}:endpoint-config/x"})
    stub.add_response("update_endpoint", {"EndpointArn": f"{ARN}:endpoint/ep"})
    stub.add_response("describe_endpoint", endpoint("Updating"), {"EndpointName": "ep"})
    stub.add_response("describe_endpoint", endpoint("InService"), {"EndpointName": "ep"})
    out = (shadow.promote_shadow_endpoint if promote else shadow.stop_shadow_endpoint)(ctx, cfg())
    config = request_log.calls("CreateEndpointConfig")[-1]
    assert [v["ModelName"] for v in config["ProductionVariants"]] == ["m-shadow" if promote else "m-prod"]
    assert [v["VariantName"] for v in config["ProductionVariants"]] == ["production"]
    assert "ShadowProductionVariants" not in config and config["DataCaptureConfig"]["EnableCapture"]
    assert request_log.calls("UpdateEndpoint")[-1] == {"EndpointName": "ep",
                                                       "EndpointConfigName": out["endpoint_config"]}


def experiment(status, name="ep-shadow", endpoint="ep"):
    return {"Arn": f"{ARN}:inference-experiment/{name}", "Name": name, "Type": "ShadowMode",
            "Status": status, "EndpointMetadata": {"EndpointName": endpoint},
            "ModelVariants": [{"ModelName": "m-prod", "VariantName": "production", "Status": "InService",
                               "InfrastructureConfig": variant("m-prod", "production")["InfrastructureConfig"]}]}


def test_inference_experiment_request_exactly(stubbed):
    ctx, _ = stubbed
    c = cfg(route="experiment", sampling_percent=30, duration_hours=2)
    start = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)
    req = shadow.inference_experiment_request(ctx, c, start=start, name="ep-shadow")
    assert req == {
        "Name": "ep-shadow", "Type": "ShadowMode", "RoleArn": ROLE, "EndpointName": "ep",
        "Description": "shadow test of m-shadow against m-prod",
        "Schedule": {"StartTime": start, "EndTime": start + dt.timedelta(hours=2)},
        "ModelVariants": [variant("m-prod", "production"), variant("m-shadow", "shadow")],
        "ShadowModeConfig": {"SourceModelVariantName": "production",
                             "ShadowModelVariants": [{"ShadowModelVariantName": "shadow", "SamplingPercentage": 30}]},
        "DataStorageConfig": {"Destination": ctx.s3_uri("capture"),
                              "ContentType": {"JsonContentTypes": ["application/json"]}},
        "Tags": [{"Key": "project", "Value": ctx.cfg.project}]}


def test_scheduled_experiment_is_started_by_sagemaker_not_by_a_start_call(stubbed, request_log):
    """The documented lifecycle: CreateInferenceExperiment with a schedule starting now; SageMaker
    moves it Creating -> Created -> Starting -> Running at the scheduled time by itself. The stub
    answers exactly these calls, in this order: a StartInferenceExperiment (ConflictException on
    AWS for a scheduled experiment) would find no queued answer and fail the test."""
    ctx, stub = stubbed
    c = cfg(route="experiment", duration_hours=3)
    before = dt.datetime.now(dt.timezone.utc)
    stub.add_response("create_inference_experiment", {"InferenceExperimentArn": f"{ARN}:inference-experiment/x"})
    for status in ("Creating", "Created", "Starting", "Running"):
        stub.add_response("describe_inference_experiment", experiment(status))
    out = shadow.start_experiment(ctx, c)
    assert out["Status"] == "Running"
    sent = request_log.calls("CreateInferenceExperiment")[-1]
    schedule = sent["Schedule"]
    assert before <= schedule["StartTime"] <= dt.datetime.now(dt.timezone.utc)
    assert schedule["EndTime"] - schedule["StartTime"] == dt.timedelta(hours=3)
    described = {p["Name"] for p in request_log.calls("DescribeInferenceExperiment")[-4:]}
    assert described == {sent["Name"]}
    assert not request_log.calls("StartInferenceExperiment")


def test_each_experiment_gets_its_own_name(stubbed):
    """``<endpoint>-shadow-<UTC timestamp>``, within the 120 characters an experiment name may have
    (a second test on the same endpoint must not collide with the first)."""
    ctx, _ = stubbed
    c = cfg(route="experiment", endpoint_name="e" * 63)
    req = shadow.inference_experiment_request(ctx, c)
    name = req["Name"]
    assert re.fullmatch("e" * 63 + r"-shadow-\d{8}-\d{6}", name), name
    stamp = dt.datetime.strptime(name[-15:], "%Y%m%d-%H%M%S").replace(tzinfo=dt.timezone.utc)
    assert abs(dt.datetime.now(dt.timezone.utc) - stamp) < dt.timedelta(seconds=30)
    check_request("sagemaker", "CreateInferenceExperiment", req)  # name length and pattern of botocore's model
    assert shadow.inference_experiment_request(ctx, cfg(route="experiment", experiment_name="mine"))["Name"] == "mine"


@pytest.mark.parametrize("hours", [0, 721])
def test_experiment_duration_within_sagemakers_30_days(stubbed, hours):
    ctx, _ = stubbed
    with pytest.raises(ValueError, match="--duration-hours .*720"):
        shadow.inference_experiment_request(ctx, cfg(route="experiment", duration_hours=hours))
    assert shadow.inference_experiment_request(ctx, cfg(route="experiment", duration_hours=720))


def test_promote_finds_the_endpoints_active_experiment_and_waits_for_completion(stubbed):
    ctx, stub = stubbed
    t = "2026-01-01"
    arn = f"{ARN}:inference-experiment/ep-shadow-2"
    stub.add_response("list_inference_experiments", {"InferenceExperiments": [
        {"Name": n, "Type": "ShadowMode", "Status": st, "CreationTime": t, "LastModifiedTime": t}
        for n, st in (("ep-shadow-1", "Cancelled"), ("other-shadow", "Running"), ("ep-shadow-2", "Running"))]},
        {"Type": "ShadowMode"})
    stub.add_response("describe_inference_experiment", experiment("Running", "other-shadow", "other"),
                      {"Name": "other-shadow"})
    stub.add_response("describe_inference_experiment", experiment("Running", "ep-shadow-2"), {"Name": "ep-shadow-2"})
    stub.add_response("stop_inference_experiment", {"InferenceExperimentArn": arn}, {
        "Name": "ep-shadow-2", "ModelVariantActions": {"shadow": "Promote", "production": "Remove"},
        "DesiredModelVariants": [variant("m-shadow", "shadow")], "DesiredState": "Completed",
        "Reason": "shadow promoted"})
    stub.add_response("describe_inference_experiment", experiment("Stopping", "ep-shadow-2"), {"Name": "ep-shadow-2"})
    stub.add_response("describe_inference_experiment", experiment("Completed", "ep-shadow-2"), {"Name": "ep-shadow-2"})
    assert shadow.stop_experiment(ctx, cfg(route="experiment"), promote=True)["Status"] == "Completed"


def test_stop_without_an_active_experiment_says_so(stubbed):
    ctx, stub = stubbed
    stub.add_response("list_inference_experiments", {"InferenceExperiments": []}, {"Type": "ShadowMode"})
    with pytest.raises(ValueError, match="no inference experiment.* active on endpoint ep.*--experiment-name"):
        shadow.stop_experiment(ctx, cfg(route="experiment"))


def test_stop_without_promotion_retains_production(stubbed):
    ctx, stub = stubbed
    arn = f"{ARN}:inference-experiment/ep-shadow"
    stub.add_response("stop_inference_experiment", {"InferenceExperimentArn": arn}, {
        "Name": "ep-shadow", "ModelVariantActions": {"production": "Retain", "shadow": "Remove"},
        "DesiredState": "Cancelled", "Reason": "shadow test stopped"})
    assert shadow.stop_experiment(ctx, cfg(route="experiment", experiment_name="ep-shadow"), wait=False) == \
        {"Name": "ep-shadow"}


def test_missing_models_are_named():
    with pytest.raises(ValueError, match="--production-model and --shadow-model"):
        shadow.shadow_endpoint_config_request(None, ShadowTestConfig(), "x")
