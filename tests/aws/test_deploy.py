"""Model packaging and the endpoint: model.tar.gz layout, model / endpoint config / endpoint on moto,
the smoke invocation, and the calls moto lacks (update_endpoint) against a Stubber."""
import io
import json
import tarfile

import pytest

from tests.aws.conftest import ROLE, queue_endpoint_results
from twotower_lit.aws import deploy
from twotower_lit.aws.config import DeployConfig
from twotower_lit.aws.session import parse_s3_uri


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from twotower_lit.serving.synthetic import random_export

    path = tmp_path_factory.mktemp("export") / "model"
    random_export(str(path), num_users=20, num_items=50, seed=0)
    return path


def handler_answer(model_dir, body, content_type: str = "application/json") -> dict:
    """What our SageMaker handler answers for a request body, with the model of `model_dir`."""
    from entrypoints import inference

    model = inference.model_fn(str(model_dir))
    return inference.predict_fn(inference.input_fn(body, content_type), model)


def real_answer(model_dir, user_id: int, k: int = 5) -> dict:
    return handler_answer(model_dir, json.dumps({"user_id": user_id, "k": k}))


# moto runs no container: the endpoint's answer is queued, written here in the serving contract's
# shape. What is checked is the smoke request deploy sends: the real handler, loaded from the uploaded
# model.tar.gz, must answer it.
SMOKE_ANSWER = {"predictions": [{"user_id": 3, "source": "model",
                                 "items": [{"id": 11, "title": "A", "genres": [], "score": 0.5}]}]}


def test_deploy_packages_uploads_creates_and_smoke_tests(ctx, exported, moto_server, request_log, tmp_path):
    queue_endpoint_results(moto_server, [{"Body": json.dumps(SMOKE_ANSWER), "ContentType": "application/json",
                                          "InvokedProductionVariant": "production"}])
    cfg = DeployConfig(model=str(exported), endpoint_name=f"ep-{ctx.cfg.project}", capture=True, smoke_user=3,
                       serving_env="TWOTOWER_MAX_K=50")
    out = deploy.deploy(ctx, cfg)
    # deploy hands back the endpoint's answer, and which variant gave it
    assert out["action"] == "created" and out["smoke"] == dict(SMOKE_ANSWER, _variant="production")
    assert out["image"].endswith("/pytorch-inference:2.6.0-cpu-py312")

    # the model.tar.gz that went to S3: model files at the top, code/ with the handler and its library
    bucket, key = parse_s3_uri(out["model_data"])
    blob = ctx.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {"manifest.json", "model.safetensors", "config.json", "code/inference.py", "code/requirements.txt",
            "code/twotower_lit/serving/handler.py", "code/twotower_lit/export/format.py"} <= names
    # only the torch-only part of the library is vendored (the training modules need torchrec)
    assert not {"code/twotower_lit/model.py", "code/twotower_lit/distributed/strategy.py",
                "code/twotower_lit/aws"} & names
    assert real_answer(tmp_path / "unpacked", 3) == real_answer(exported, 3)  # loads from its own layout

    model = request_log.calls("CreateModel")[-1]
    assert model["ExecutionRoleArn"] == ROLE and model["PrimaryContainer"]["Environment"] == {
        "SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "TWOTOWER_NUM_THREADS": "1", "TWOTOWER_MAX_K": "50"}
    config = request_log.calls("CreateEndpointConfig")[-1]
    assert config["DataCaptureConfig"]["CaptureOptions"] == [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}]
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == ctx.s3_uri("capture")
    assert {"Key": "project", "Value": ctx.cfg.project} in config["Tags"]
    invoke = request_log.calls("InvokeEndpoint")[-1]
    assert invoke["InferenceId"].startswith("smoke-") and invoke["ContentType"] == "application/json"
    assert invoke["EndpointName"] == cfg.endpoint_name
    body = invoke["Body"].decode() if isinstance(invoke["Body"], bytes) else invoke["Body"]
    answer = handler_answer(tmp_path / "unpacked", body, invoke["ContentType"])
    (pred,) = answer["predictions"]
    assert pred["user_id"] == 3 and len(pred["items"]) == 5  # the smoke user, k = 5
    described = ctx.sagemaker.describe_endpoint_config(EndpointConfigName=out["endpoint_config"])
    assert described["ProductionVariants"][0]["ModelName"] == out["model"]


def test_own_image_gets_only_our_settings(ctx):
    req = deploy.model_request(ctx, "m", "123456789012.dkr.ecr.us-east-1.amazonaws.com/twotower-serve:1",
                               "s3://b/m.tar.gz", {"TWOTOWER_MAX_K": "50"})
    assert req["PrimaryContainer"]["Environment"] == {"TWOTOWER_MAX_K": "50"}


def test_smoke_invoke_rejects_an_answer_without_predictions(ctx, moto_server):
    name = f"ep-{ctx.cfg.project}"
    queue_endpoint_results(moto_server, [{"Body": '{"error": {"status": 500}}', "ContentType": "application/json"}])
    with pytest.raises(RuntimeError, match="without predictions"):
        deploy.smoke_invoke(ctx, name, 1)


def test_model_from_a_training_job_uses_its_artifacts(ctx):
    """job:<name> -> the job's model.tar.gz (the job is created here directly; moto completes it at once)."""
    ctx.sagemaker.create_training_job(
        TrainingJobName=f"job-{ctx.cfg.project}", RoleArn=ROLE,
        AlgorithmSpecification={"TrainingImage": "img", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": ctx.s3_uri("training")},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})
    uri = deploy.model_data_uri(ctx, f"job:job-{ctx.cfg.project}", "unused")
    assert uri.startswith(ctx.s3_uri("training")) and uri.endswith("/output/model.tar.gz")


def test_existing_endpoint_is_moved_to_the_new_config(stubbed):
    """update_endpoint (not in moto): an existing endpoint gets the new config, blue/green."""
    ctx, stub = stubbed
    stub.add_response("describe_endpoint", {"EndpointName": "ep",
                                            "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/ep",
                                            "EndpointStatus": "InService", "CreationTime": "2026-01-01",
                                            "LastModifiedTime": "2026-01-01"}, {"EndpointName": "ep"})
    stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/ep"},
                      {"EndpointName": "ep", "EndpointConfigName": "cfg-2"})
    assert deploy.create_or_update_endpoint(ctx, "ep", "cfg-2") == "updated"


def test_wait_reports_the_failure_reason(stubbed):
    ctx, stub = stubbed
    stub.add_response("describe_endpoint", {"EndpointName": "ep",
                                            "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/ep",
                                            "EndpointStatus": "Failed", "FailureReason": "model_fn raised",
                                            "CreationTime": "2026-01-01", "LastModifiedTime": "2026-01-01"})
    with pytest.raises(RuntimeError, match="model_fn raised"):
        deploy.wait_for_endpoint(ctx, "ep", timeout=5, poll=0.1)
