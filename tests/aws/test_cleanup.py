"""Cleanup by tag: on moto for models / endpoint configs / endpoints / S3, and against a Stubber for
inference experiments, running training jobs and MLflow servers (not in moto)."""
import pytest

from tests.aws.conftest import ROLE
from twotower_lit.aws import cleanup, deploy
from twotower_lit.aws.config import AwsConfig
from twotower_lit.aws.session import AwsContext

ARN = "arn:aws:sagemaker:us-east-1:123456789012"
MOTO_KINDS = ("endpoint", "endpoint-config", "model")


def make_endpoint(c: AwsContext, name: str) -> None:
    c.sagemaker.create_model(**deploy.model_request(c, f"{name}-model", "img", c.s3_uri("m.tar.gz")))
    c.sagemaker.create_endpoint_config(**deploy.endpoint_config_request(
        c, f"{name}-config", [deploy.production_variant(f"{name}-model", "production", "ml.m5.large")]))
    deploy.create_or_update_endpoint(c, name, f"{name}-config")


def test_removes_only_what_carries_the_project_tag(ctx, moto_server, recording_session, tmp_path):
    other = AwsContext(AwsConfig(endpoint_url=moto_server, region="us-east-1", role=ROLE, bucket=ctx.cfg.bucket,
                                 project=ctx.cfg.project + "-other", prefix="other"), session=recording_session)
    make_endpoint(ctx, f"{ctx.cfg.project}-ep")
    make_endpoint(other, f"{other.cfg.project}-ep")
    ctx.s3.put_object(Bucket=ctx.cfg.bucket, Key=f"{ctx.cfg.prefix}/models/x/model.tar.gz", Body=b"x")
    ctx.s3.put_object(Bucket=ctx.cfg.bucket, Key="other/keep.txt", Body=b"x")

    mine = {"endpoint": [f"{ctx.cfg.project}-ep"], "endpoint-config": [f"{ctx.cfg.project}-ep-config"],
            "model": [f"{ctx.cfg.project}-ep-model"]}
    planned = cleanup.cleanup(ctx, MOTO_KINDS, s3=True, dry_run=True)
    assert planned == {**mine, "s3": [ctx.s3_uri("models/x/model.tar.gz")]}
    assert cleanup.find_resources(ctx, MOTO_KINDS) == mine  # a dry run removes nothing

    assert cleanup.cleanup(ctx, MOTO_KINDS, s3=True) == planned
    assert cleanup.find_resources(ctx, MOTO_KINDS) == {k: [] for k in MOTO_KINDS}
    assert cleanup.find_resources(other, MOTO_KINDS) == {
        "endpoint": [f"{other.cfg.project}-ep"], "endpoint-config": [f"{other.cfg.project}-ep-config"],
        "model": [f"{other.cfg.project}-ep-model"]}
    keys = [o["Key"] for o in ctx.s3.list_objects_v2(Bucket=ctx.cfg.bucket).get("Contents", [])]
    assert keys == ["other/keep.txt"]
    assert "removed 1 endpoint(s)" in cleanup.describe(planned)


def test_tags_are_read_page_by_page_and_finished_training_jobs_are_left_alone(ctx, request_log):
    """On moto: a model whose project tag comes after 60 others is found (ListTags answers in pages),
    one without it is not; training jobs, which moto completes at creation, are listed as
    InProgress only, so a finished job of the project is never stopped."""
    extra = [{"Key": f"k{i:02d}", "Value": "v"} for i in range(60)]
    for name, tags in ((f"{ctx.cfg.project}-late-tag", extra + ctx.tags()), (f"{ctx.cfg.project}-no-tag", extra)):
        ctx.sagemaker.create_model(ModelName=name, ExecutionRoleArn=ROLE,
                                   PrimaryContainer={"Image": "img", "ModelDataUrl": ctx.s3_uri("m.tar.gz")}, Tags=tags)
    ctx.sagemaker.create_training_job(
        TrainingJobName=f"job-{ctx.cfg.project}", RoleArn=ROLE, Tags=ctx.tags(),
        AlgorithmSpecification={"TrainingImage": "img", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": ctx.s3_uri("training")},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})
    before = len(request_log.calls("ListTags"))
    found = cleanup.find_resources(ctx, ("model", "training-job"))
    assert f"{ctx.cfg.project}-late-tag" in found["model"] and f"{ctx.cfg.project}-no-tag" not in found["model"]
    assert found["training-job"] == []
    pages = [c for c in request_log.calls("ListTags")[before:] if c["ResourceArn"].endswith("-late-tag")]
    assert len(pages) >= 2 and "NextToken" in pages[-1]  # the project tag was on a later page
    assert request_log.calls("ListTrainingJobs")[-1] == {"StatusEquals": "InProgress"}
    assert cleanup.cleanup(ctx, ("training-job",)) == {"training-job": []}
    assert not request_log.calls("StopTrainingJob")


def test_experiments_jobs_and_mlflow_servers(stubbed):
    """The kinds moto cannot hold: inference experiments and MLflow servers (not implemented), and a
    running training job (moto completes a job when it is created), so their listings and tags come
    from a Stubber."""
    ctx, stub = stubbed
    tag = {"Tags": [{"Key": "project", "Value": ctx.cfg.project}]}
    untagged = {"Tags": [{"Key": "project", "Value": "someone-else"}]}
    t = "2026-01-01"
    variants = [{"ModelName": m, "VariantName": v, "Status": "InService", "InfrastructureConfig": {
        "InfrastructureType": "RealTimeInference",
        "RealTimeInferenceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1}}}
        for m, v in (("m-prod", "production"), ("m-shadow", "shadow"))]
    experiment = {
        "Arn": f"{ARN}:inference-experiment/ie-1", "Name": "ie-1", "Type": "ShadowMode", "Status": "Running",
        "EndpointMetadata": {"EndpointName": "ep"}, "ModelVariants": variants,
        "ShadowModeConfig": {"SourceModelVariantName": "production", "ShadowModelVariants": [
            {"ShadowModelVariantName": "shadow", "SamplingPercentage": 100}]}}
    stub.add_response("list_inference_experiments", {"InferenceExperiments": [
        {"Name": "ie-1", "Type": "ShadowMode", "Status": "Running", "CreationTime": t, "LastModifiedTime": t}]}, {})
    stub.add_response("describe_inference_experiment", experiment, {"Name": "ie-1"})
    stub.add_response("list_tags", tag, {"ResourceArn": f"{ARN}:inference-experiment/ie-1"})
    stub.add_response("list_training_jobs", {"TrainingJobSummaries": [
        {"TrainingJobName": n, "TrainingJobArn": f"{ARN}:training-job/{n}", "CreationTime": t,
         "TrainingJobStatus": "InProgress"} for n in ("job-1", "job-2")]}, {"StatusEquals": "InProgress"})
    stub.add_response("list_tags", tag, {"ResourceArn": f"{ARN}:training-job/job-1"})
    stub.add_response("list_tags", untagged, {"ResourceArn": f"{ARN}:training-job/job-2"})
    stub.add_response("list_mlflow_tracking_servers", {"TrackingServerSummaries": [
        {"TrackingServerName": "mlf", "TrackingServerArn": f"{ARN}:mlflow-tracking-server/mlf"}]}, {})
    stub.add_response("list_tags", tag, {"ResourceArn": f"{ARN}:mlflow-tracking-server/mlf"})
    # stopping is asynchronous: the experiment is deleted only once it has ended (AWS answers a
    # delete of a Stopping experiment, and of its endpoint, with a ConflictException)
    stub.add_response("describe_inference_experiment", experiment, {"Name": "ie-1"})
    stub.add_response("stop_inference_experiment", {"InferenceExperimentArn": f"{ARN}:inference-experiment/ie-1"},
                      {"Name": "ie-1", "ModelVariantActions": {"production": "Retain", "shadow": "Remove"},
                       "DesiredState": "Cancelled", "Reason": "project cleanup"})
    for status in ("Stopping", "Stopping", "Cancelled"):
        stub.add_response("describe_inference_experiment", {**experiment, "Status": status}, {"Name": "ie-1"})
    stub.add_response("delete_inference_experiment", {"InferenceExperimentArn": f"{ARN}:inference-experiment/ie-1"},
                      {"Name": "ie-1"})
    stub.add_response("stop_training_job", {}, {"TrainingJobName": "job-1"})
    stub.add_response("delete_mlflow_tracking_server", {"TrackingServerArn": f"{ARN}:mlflow-tracking-server/mlf"},
                      {"TrackingServerName": "mlf"})
    found = cleanup.cleanup(ctx, ("mlflow-tracking-server", "training-job", "inference-experiment"), poll=0.0)
    assert found == {"inference-experiment": ["ie-1"], "training-job": ["job-1"], "mlflow-tracking-server": ["mlf"]}


def test_an_experiment_that_does_not_stop_in_time_is_reported_not_deleted(stubbed):
    ctx, stub = stubbed
    t = "2026-01-01"
    experiment = {"Arn": f"{ARN}:inference-experiment/ie-2", "Name": "ie-2", "Type": "ShadowMode",
                  "Status": "Stopping", "EndpointMetadata": {"EndpointName": "ep"}, "ModelVariants": []}
    stub.add_response("list_inference_experiments", {"InferenceExperiments": [
        {"Name": "ie-2", "Type": "ShadowMode", "Status": "Stopping", "CreationTime": t, "LastModifiedTime": t}]}, {})
    stub.add_response("describe_inference_experiment", experiment, {"Name": "ie-2"})
    stub.add_response("list_tags", {"Tags": [{"Key": "project", "Value": ctx.cfg.project}]},
                      {"ResourceArn": f"{ARN}:inference-experiment/ie-2"})
    # already Stopping: no second stop, one look while waiting (the time limit is 0), and no delete
    stub.add_response("describe_inference_experiment", experiment, {"Name": "ie-2"})
    stub.add_response("describe_inference_experiment", experiment, {"Name": "ie-2"})
    with pytest.raises(TimeoutError, match="inference experiment ie-2 still Stopping after 0 s"):
        cleanup.cleanup(ctx, ("inference-experiment",), wait_timeout=0, poll=0.0)
